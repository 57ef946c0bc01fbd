#!/usr/bin/env bash
# `make demo`: start an agent in the background, run a real microVM named "demo" and show it.
# `make demo-stop`: stop the VM and the agent.
set -euo pipefail
: "${DEMO_DIR:?}" "${BIN:?}"
SOCK="$DEMO_DIR/stoker.sock"
export STOKER_SOCKET="$SOCK"
stoker() { "$BIN/stoker" "$@"; }

if [ "${1:-}" = "stop" ]; then
    if [ -S "$SOCK" ]; then
        stoker vm delete demo --force 2>/dev/null || true
    fi
    if [ -f "$DEMO_DIR/agent.pid" ]; then
        kill "$(cat "$DEMO_DIR/agent.pid")" 2>/dev/null || true
        rm -f "$DEMO_DIR/agent.pid"
    fi
    echo "demo stopped"
    exit 0
fi

mkdir -p "$DEMO_DIR"
agent_up() { stoker vm list --json >/dev/null 2>&1; }

if ! agent_up; then
    STOKER_DATA_DIR="$DEMO_DIR" nohup "$BIN/stoker" agent >"$DEMO_DIR/agent.log" 2>&1 &
    echo $! >"$DEMO_DIR/agent.pid"
    for _ in $(seq 100); do
        agent_up && break
        sleep 0.1
    done
    agent_up || { echo "the agent did not start; see $DEMO_DIR/agent.log" >&2; exit 1; }
    echo "agent running (pid $(cat "$DEMO_DIR/agent.pid"), log $DEMO_DIR/agent.log, socket $SOCK)"
fi

stoker vm delete demo --force >/dev/null 2>&1 || true
PORT=$("$BIN/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# user-mode networking: the demo makes no bridge or NAT rule on this host
stoker vm create demo --guest --memory 128 --net user --forward "$PORT:80" --label app=demo \
    --restart-policy on-failure --start
echo
stoker vm list
echo
echo "guest health endpoint: curl http://127.0.0.1:$PORT/health"
curl -fsS --max-time 5 "http://127.0.0.1:$PORT/health"
echo
echo "Try: STOKER_SOCKET=$SOCK $BIN/stoker vm show demo"
echo "Stop everything with: make demo-stop"
