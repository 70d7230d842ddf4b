#!/usr/bin/env bash
# apt-get install PACKAGE... quietly, with sudo when not root (Debian/Ubuntu); used by the
# install-*.sh scripts.
set -euo pipefail
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "$@" >/dev/null
