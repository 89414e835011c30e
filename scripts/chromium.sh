#!/usr/bin/env bash
# Installs Chromium and its WebDriver from Debian when missing: the API docs test opens /docs in
# a real headless browser. With them, h2load (nghttp2-client), the benchmark's gRPC load
# generator, whose tests drive a real server with it: one apt run for both.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v h2load >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "chromium, chromedriver or h2load is missing; install Debian's 'chromium', 'chromium-driver' and 'nghttp2-client' packages" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver nghttp2-client >/dev/null
