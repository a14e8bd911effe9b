#!/usr/bin/env bash
# Set up (dev/setup.sh), then run the end-to-end demo: a local http-folder marketplace served by
# nginx on loopback, driven through the real MAD as oned would drive it (no oned needed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash dev/setup.sh --demo
exec .venv/bin/python dev/demo.py
