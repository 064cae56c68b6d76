#!/usr/bin/env bash
# Installs the real tools the tests use (Debian packages) when they are missing: prometheus and
# promtool (end-to-end tests, relabel rules), shellcheck (the deploy kit's shell examples).
# As root it installs them; otherwise it says what is missing, and the tests that need them skip
# locally and fail under CI=true.
set -euo pipefail

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
# shellcheck disable=SC2207
packages=($(printf '%s\n' "${missing[@]}" | sort -u))

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing: ${packages[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
else
  echo "missing system packages (install as root or with sudo): ${packages[*]}" >&2
fi
