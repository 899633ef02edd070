#!/bin/bash
# Installs the Debian packages gatherd needs to build, test, demo and
# benchmark. Safe to run again: it only calls apt-get when something is
# missing. Run as root (or with sudo available).
set -euo pipefail
PKGS="build-essential autoconf automake pkg-config libevent-dev libjansson-dev libssl-dev node-llhttp
      python3 python3-yaml curl ca-certificates openssl clang wrk nginx-light chromium logrotate mmdebstrap"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "install-deps: installing:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null; then
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
