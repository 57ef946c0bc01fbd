#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages stoker needs, only those that are missing.
set -euo pipefail

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

have_cmd qemu-system-x86_64 || need+=(qemu-system-x86)
have_cmd qemu-img || need+=(qemu-utils)
# (no pipe into grep -q: with pipefail, busybox's SIGPIPE would count as failure)
applets=$( [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null || true )
grep -qx httpd <<<"$applets" || need+=(busybox-static)
have_cmd cpio || need+=(cpio)
have_cmd mkfs.ext4 || need+=(e2fsprogs)
have_cmd ip || need+=(iproute2)
have_cmd curl || need+=(curl)
have_cmd promtool || need+=(prometheus)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
have_cmd nft || need+=(nftables)
have_cmd dnsmasq || need+=(dnsmasq-base)
have_cmd etcd || need+=(etcd-server)
have_cmd etcdctl || need+=(etcd-client)
have_cmd chromium || need+=(chromium)
have_cmd chromedriver || need+=(chromium-driver)
have_cmd setpriv || need+=(util-linux)
have_cmd npm || need+=(npm)  # installs the web console's htmx and uPlot (make web)
have_cmd systemd-analyze || need+=(systemd)  # checks packaging/stoker.service

if [ ${#need[@]} -eq 0 ]; then
    echo "system packages: all present"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    have_cmd sudo || { echo "need root (or sudo) to install: ${need[*]}" >&2; exit 1; }
    SUDO=sudo
fi
echo "system packages: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
