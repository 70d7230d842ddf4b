#!/usr/bin/env bash
# Headless Chromium and its WebDriver, used by the web chat's browser test.
# Debian/Ubuntu only; safe to run again. Needs root (or sudo) for apt-get.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
bash "$(dirname "$0")/apt-install.sh" chromium chromium-driver
/usr/bin/chromium --version
