#!/usr/bin/env bash
# The whole test suite, from a fresh clone: install what the tests need, lint, type-check, test.
# The README's "Test it" and CI's .ci/run both run exactly this file.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests start themselves come from Debian packages (systemd: systemd-analyze verify
# for deploy/retrofit-gateway.service; installing it starts nothing where systemd is not init).
APT_PACKAGES=(socat mosquitto mosquitto-clients chromium systemd)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"

# Eclipse Tahu's JavaScript decoder, an independent check of our Sparkplug B payloads.
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
  (cd tests/sparkplug_js && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
else
  echo "== node/npm not found: the Sparkplug tests that decode with Tahu's JavaScript library skip (on CI they fail)"
fi

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy (strict on gateway/ and drivers/)"
.venv/bin/mypy
echo "== example configs validate"
.venv/bin/retrofit-gw check config/demo.yaml config/production.example.yaml
echo "== pytest"
.venv/bin/python -m pytest "$@"
