#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script: the DLPack CUDA path and the core's tests on
# the GPU, then the full benchmark suite. Needs jax with CUDA, torch with CUDA, lightning,
# flax, pytest and hypothesis on the machine; run from the repository root:
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
# Results land in $OUT (copy <machine>.json/.md into benchmarks/results/ to publish them).
set -uo pipefail
OUT=${OUT:-/tmp/jaxnorm-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda,cpu
# torch baselines share the GPU: do not let jax take 75% of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_torch_compat_dlpack.py tests/test_torch_compat_hooks.py \
  tests/test_normalize.py tests/test_hook.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-330}" python3 -m benchmarks --no-readme --out "$OUT" 2>&1 | tee "$OUT/bench.log"
