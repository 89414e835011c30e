#!/usr/bin/env bash
# Installs Prometheus (the server and promtool) from Debian when missing: the metrics tests run
# the real tools. The package's service is kept from starting, so nothing is left on port 9090.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "promtool and prometheus are missing; install Debian's 'prometheus' package" >&2
  exit 1
fi
# policy-rc.d answering 101 tells invoke-rc.d and deb-systemd-invoke not to start services.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq
# No recommends: they would add prometheus-node-exporter, another service.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
