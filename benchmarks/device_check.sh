#!/usr/bin/env bash
# The accelerator checks of the attention kernels, in one run that fits in 8 minutes on one H200:
#   1. the kernel parity tests natively (pytest + hypothesis when installed; otherwise, and always,
#      `benchmarks/attention.py --parity`, which needs neither),
#   2. benchmarks/attention.py: tiles visited, mask memory, fwd+bwd timings against causal flash and
#      dense XLA at L = 2048 / 4096 / 8192 (Phi-3.5 shapes, bf16),
#   3. benchmarks/train_step_4b.py: one bf16 train step of an AKI-4B-shaped model with MFU
#      (32 decoder layers, falling back to 16 or 8 if memory runs out).
# Run from the repository root:  bash benchmarks/device_check.sh
# Needs jax (with CUDA or TPU), flax, optax; no grain, tensorflow-datasets or network.
# Everything printed also goes to $OUT/device_check.log and the JSON results to $OUT/*.json when OUT is set.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/aki-device-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT
PY="${PYTHON:-python3}"
status=0
exec > >(tee "$OUT/device_check.log") 2>&1

backend=$("$PY" -c 'import jax; print(jax.default_backend())')
echo "== $(date -u +%FT%TZ) backend=$backend jax=$("$PY" -c 'import jax; print(jax.__version__)')"
"$PY" -c 'import jax; print(jax.devices())'
case "$backend" in
  gpu|cuda) kernel=pallas_gpu; platforms=cuda ;;
  tpu) kernel=pallas_tpu; platforms=tpu ;;
  *) echo "no accelerator: the kernels would only run interpreted (use pytest tests/test_attention_kernels.py)"; kernel="" ;;
esac

if [ -n "$kernel" ]; then
  echo "== 1. kernel tests, native ($kernel)"
  if "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
    JAX_PLATFORMS=$platforms AKI_ATTENTION_KERNELS=$kernel timeout 100 "$PY" -m pytest -q -p no:cacheprovider \
      tests/test_attention_kernels.py -k "output_and_gradients or bfloat16 or phi35 or pad_queries or bool_mask" || status=1
  else
    echo "pytest/hypothesis not installed: the native parity run below stands in for the tests"
  fi
  timeout 60 "$PY" benchmarks/attention.py --parity --lengths 2048 --out "$OUT/parity" || status=1
fi

echo "== 2. attention benchmark"
timeout 140 "$PY" benchmarks/attention.py ${kernel:+--time} --out "$OUT" || status=1

if [ -n "$kernel" ]; then
  echo "== 3. AKI-4B-shaped train step, bf16"
  timeout 180 "$PY" benchmarks/train_step_4b.py --layers 32 16 8 --batch 4 --length 2048 --steps 3 || status=1
fi
echo "== done, status $status (results in $OUT)"
exit $status
