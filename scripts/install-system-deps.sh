#!/usr/bin/env bash
# Installs the real tools the tests use (Debian packages) when they are missing: prometheus and
# promtool (end-to-end tests, relabel rules), shellcheck (the deploy kit's shell examples), and the
# benchmark's peers (tests/test_benchmarks_smoke.py, `make bench`): nginx-light, wrk and
# prometheus-exporter-exporter; and prometheus-node-exporter, the real Go exporter (client_golang's
# promhttp and exporter-toolkit, as windows_exporter) that tests/test_node_exporter.py proxies.
# As root it installs them; otherwise it says what is missing, and the tests that need them skip
# locally and fail under CI=true.
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
# nginx is in /usr/sbin, which a non-root PATH may lack.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v prometheus-exporter-exporter >/dev/null 2>&1 || missing+=(prometheus-exporter-exporter)
command -v prometheus-node-exporter >/dev/null 2>&1 || missing+=(prometheus-node-exporter)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
# shellcheck disable=SC2207
packages=($(printf '%s\n' "${missing[@]}" | sort -u))

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing: ${packages[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # The packages' services (nginx on *:80, exporter_exporter on *:9999, prometheus on *:9090,
  # node_exporter on *:9100) must not start: the tests run their own instances on 127.0.0.1.
  # Debian's policy-rc.d hook says so.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
else
  echo "missing system packages (install as root or with sudo): ${packages[*]}" >&2
fi
