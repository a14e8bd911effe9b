#!/usr/bin/env bash
# Set up (dev/setup.sh), lint, then run the whole test suite with the real servers.
# Extra arguments go to pytest (e.g. dev/test.sh -k s3 -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash dev/setup.sh
.venv/bin/ruff check lib tests bench dev
.venv/bin/python -m pytest -ra "$@"
