#!/usr/bin/env bash
# Create .venv (Python 3.11+) and install the project with its test tools. Idempotent: re-running
# after a change to pyproject.toml reinstalls; otherwise it returns at once.
#
# torch 2.14.1 + torchvision 0.29.1 go first: open_clip needs torchvision, and that pair is the one
# that works together on the project's machines (pip finds them on local disk; elsewhere on PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
export NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
"$VENV/bin/python" -m pip install -q -e '.[test]'
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "environment ready: $VENV" >&2
