#!/usr/bin/env bash
# One GPU-box experiment per device call (see ../shared/gpu/README.md for the
# staging): installs the carried vLLM, runs one experiment, and packs every log
# and result into $OUT/results.tar.gz (only a few files come back).
#   bash benchmarks/gpu_session.sh micro|exact|restart|xpyd|placement|first-token-exact|
#     first-token-light|e2e-aggregated|e2e-pdserve ...
# (several experiments run one after another in the same call)
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p "$OUT/r"
# Leftovers of an earlier call (one that ran out of time) hold GPU memory.
pkill -9 -f "[p]dserve.entrypoints.api_server|[p]lain_vllm|[V]LLM::" 2>/dev/null
bash /tmp/stage/tools/device_install.sh > "$OUT/r/install.log" 2>&1 || {
  tail -20 "$OUT/r/install.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# pdserve nodes authenticate their side channel, as in production: producers
# serve ipc and nccl only to consumers that proved the KV secret (gpu_env in
# gpu_e2e.py gives every node this one, or one of its own if it is unset).
export PDSERVE_KV_SECRET=${PDSERVE_KV_SECRET:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/r/gpus.csv" 2>&1
QWEN=/tmp/stage/tools/model-qwen2-7b
TINY=/tmp/stage/tools/tiny-model
status=0
for what in "$@"; do
case $what in
  micro)
    python3 benchmarks/transport_microbench.py --transports "${TRANSPORTS:-ipc,nccl,tcp}" \
      --json "$OUT/r/microbench.json" 2>&1 | tee "$OUT/r/microbench.txt" || status=1 ;;
  exact)
    python3 benchmarks/gpu_token_exact.py --model "$TINY" --tp 1 \
      --out "$OUT/r/exact" 2>&1 | tee "$OUT/r/exact.txt" || status=1 ;;
  restart)
    python3 benchmarks/gpu_restart.py --model "$TINY" --transports "${TRANSPORTS:-ipc,nccl}" \
      --out "$OUT/r/restart" 2>&1 | tee "$OUT/r/restart.txt" || status=1 ;;
  xpyd)
    python3 benchmarks/gpu_xpyd.py --model "$TINY" --transport "${TRANSPORT:-ipc}" \
      --out "$OUT/r/xpyd" 2>&1 | tee "$OUT/r/xpyd.txt" || status=1 ;;
  first-token-exact)
    python3 benchmarks/gpu_first_token.py exact --model "$TINY" --out "$OUT/r/ft-exact" \
      2>&1 | tee "$OUT/r/ft-exact.txt" || status=1 ;;
  first-token-light)
    python3 benchmarks/gpu_first_token.py light --model "$QWEN" --out "$OUT/r/ft-light" \
      --runs "${RUNS:-12}" ${EAGER:+--eager} 2>&1 | tee "$OUT/r/ft-light.txt" || status=1 ;;
  placement)
    python3 benchmarks/gpu_placement.py --model "$TINY" --out "$OUT/r/placement" 2>&1 \
      | tee "$OUT/r/placement.txt" || status=1 ;;
  e2e-*)
    python3 benchmarks/gpu_e2e.py --model "$QWEN" --setups "${what#e2e-}" \
      --rates "${RATES:-4,16,32,inf}" --num-prompts 200 --seconds-per-rate 50 \
      --seed "${SEED:-5000}" --out "$OUT/r/e2e" 2>&1 | tee "$OUT/r/e2e.txt" || status=1 ;;
  *) echo "unknown experiment $what"; status=2 ;;
esac
done
# Whatever happened, the logs come back.
pkill -9 -f "pdserve.entrypoints.api_server|plain_vllm|VLLM::" 2>/dev/null
tar czf "$OUT/results.tar.gz" -C "$OUT" r && rm -rf "$OUT/r"
exit $status
