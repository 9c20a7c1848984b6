#!/usr/bin/env bash
# The browser tests drive Debian's chromium (Playwright cannot download its own browsers here):
# install it with apt if it is missing. Run by `make test`.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-browser: chromium is missing; install it (apt-get install -y chromium) and run again" >&2
    exit 1
fi
echo "ensure-browser: installing chromium with apt" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null
