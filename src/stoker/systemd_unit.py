"""The systemd unit that runs the agent as a service.

``packaging/stoker.service`` holds the same text (a test keeps the two identical), and
``stoker agent --print-systemd-unit`` prints it, so an installed stoker can write its own
unit without the source tree.
"""

from __future__ import annotations

UNIT = """\
# stoker: the node agent that keeps microVMs alive.
#
#   stoker agent --print-systemd-unit > /etc/systemd/system/stoker.service
#   systemctl daemon-reload && systemctl enable --now stoker
#
# Settings go in /etc/stoker/agent.toml, named by STOKER_CONFIG in /etc/default/stoker
# (which may also set PATH if stoker lives in a virtual environment).

[Unit]
Description=stoker node agent (keeps microVMs alive)
After=network-online.target
Wants=network-online.target

[Service]
# READY=1 comes once running VMs are re-adopted and every API listener serves
Type=notify
NotifyAccess=main
EnvironmentFile=-/etc/default/stoker
ExecStart=/usr/bin/env stoker agent
StateDirectory=stoker
StateDirectoryMode=0700
TimeoutStartSec=300
# WATCHDOG=1 is sent from the agent's event loop: a hung loop is restarted
WatchdogSec=30
Restart=on-failure
RestartSec=2
# VMs outlive the agent: a stop or restart signals the agent alone, never a VMM (each runs
# in its own session, and in its own cgroup once quotas place it there)
KillMode=process
TimeoutStopSec=60
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""
