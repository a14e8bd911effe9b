#!/usr/bin/env bash
# Prepare a Debian machine for development and tests: the Debian packages the test servers need
# (dev/apt-packages.txt: nginx, sshd, Ceph RGW, qemu-utils ...; only nginx with --demo) and a
# venv in .venv with the library installed editable plus the test tools. Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --demo: only what dev/demo.sh needs (nginx), not the test servers (sshd, Ceph RGW ...)
if [ "${1:-}" = "--demo" ]; then
  pkgs=(nginx-light)
else
  mapfile -t pkgs < <(grep -v '^\s*#' dev/apt-packages.txt | awk 'NF {print $1}')
fi
missing=()
for p in python3 python3-venv "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # policy-rc.d keeps the package scripts from starting system-wide nginx/sshd/ceph services:
  # the tests start their own instances on loopback ports.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
echo "setup: ready (.venv)"
