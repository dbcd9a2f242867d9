#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script: the CUDA tests (every test file that
# mentions CUDA, plus the core's hook, normalize and shim-hook tests on the GPU, and the
# sharded tests, which must take the CPU devices when the GPU is jax's default), then every
# benchmark case, whose pipelined cases (pipeline, overhead, fused, load, loop) judge the GPU
# targets, then the shim's per-batch probe (test and validation, fresh tensors each batch,
# against anomalib 0.7's callback, with the steps of the steady test path timed apart) at tiny
# and real map sizes, and the CUDA exchange's stream orderings and alignment
# (cuda_exchange_probe.py). Needs jax with CUDA, torch with CUDA, lightning, flax, pytest and
# hypothesis on the machine; run from the repository root:
#   OUT=/tmp/gpu bash benchmarks/gpu/gpu_check.sh
# Results land in $OUT: copy <machine>.json/.md into benchmarks/results/ and run
# `make bench-replot` to publish them (a run of every case is what the README's headline
# block, docs/_generated/ and the plot read; a GPU run of a new day replaces the stored
# H200 run of a replaced design in the headline, see SUPERSEDED in benchmarks/publish.py).
# Knobs: TEST_TIMEOUT, BENCH_TIMEOUT and PROBE_TIMEOUT (seconds; 150 + 360 + 3 x 20 by
# default, to fit one 10-minute device call), CASES (comma-separated, default every case; a
# subset is published only for the cases the full run lacks), QUICK=1 for a smoke run of the
# harness on the GPU, PROBES=0 to skip the probes.
set -uo pipefail
OUT=${OUT:-/tmp/jaxnorm-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu
# torch baselines share the GPU: do not let jax take 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$SECONDS
nvidia-smi -L
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"

# CUDA tests: files written later (e.g. the shim's CUDA import path) are picked up by name.
mapfile -t cuda_tests < <(grep -ril cuda tests --include='test_*.py' | grep -v test_benchmarks_smoke)
tests=("${cuda_tests[@]}" tests/torch_compat/test_callback.py tests/torch_compat/test_steady.py tests/jaxnorm/test_normalize.py tests/jaxnorm/test_hook.py
  tests/jaxnorm/test_hook_sharded.py tests/jaxnorm/test_nnx_metric.py)
for t in "${tests[@]}"; do  # a renamed file must not drop out of the check unseen
  [[ -e "$t" ]] || { echo "gpu_check.sh: $t does not exist; update the list" >&2; exit 2; }
done
mapfile -t tests < <(printf '%s\n' "${tests[@]}" | sort -u)
echo "CUDA tests: ${tests[*]}"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -rs "${tests[@]}" 2>&1 \
  | tee "$OUT/gpu_tests.log"
echo "tests: rc ${PIPESTATUS[0]} after $((SECONDS - start)) s"

args=(--no-readme --out "$OUT")
[[ -n "${CASES:-}" ]] && args+=(--cases "$CASES")
[[ "${QUICK:-0}" == 1 ]] && args+=(--quick)
timeout "${BENCH_TIMEOUT:-360}" python3 -m benchmarks "${args[@]}" 2>&1 | tee "$OUT/bench.log"
echo "benchmarks: rc ${PIPESTATUS[0]} after $((SECONDS - start)) s"

if [[ "${PROBES:-1}" == 1 ]]; then
  for run in "8 200" "256 50"; do
    read -r size batches <<<"$run"
    timeout "${PROBE_TIMEOUT:-20}" python3 benchmarks/gpu/shim_probe.py --size "$size" \
      --batches "$batches" --rounds 7 --parts 2>&1 | tee -a "$OUT/shim_probe.log"
  done
  timeout "${PROBE_TIMEOUT:-20}" python3 benchmarks/gpu/cuda_exchange_probe.py 2>&1 \
    | tee "$OUT/cuda_exchange_probe.log"
  echo "probes: done after $((SECONDS - start)) s"
fi
