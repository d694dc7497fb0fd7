#!/usr/bin/env bash
# Creates .venv with everything the pipeline and its tests need; TORCH_SPEC overrides the torch pin.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -r requirements-dev.txt
