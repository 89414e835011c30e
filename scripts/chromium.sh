#!/usr/bin/env bash
# Installs Chromium and its WebDriver from Debian when missing: the API docs test opens /docs in
# a real headless browser.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "chromium and chromedriver are missing; install Debian's 'chromium' and 'chromium-driver' packages" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
