#!/usr/bin/env bash
# Try it: install the gateway into a private venv and start the demo (simulated lathe and mill,
# gateway polling them). Nothing outside this checkout is touched. Ctrl-C stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e ".[demo]"
exec .venv/bin/retrofit-gw demo "$@"
