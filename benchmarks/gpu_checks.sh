#!/bin/bash
# Issue 3's checks that need a GPU, in one call (the lent machine has no network and a short lease).
#
# Prepare on the CPU machine, from the repo root (.whl and .gpu are git-ignored via
# .git/info/exclude):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_34_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     constriction==0.5.0 compressai==1.2.8 pytorch-msssim tomli diffusers==0.42.1 \
#     importlib-metadata ml-collections
#   python benchmarks/cross_device_files.py run .gpu/xdev --precision default   # and highest
# Run there with .whl and .gpu carried:  bash benchmarks/gpu_checks.sh [STAGE ...]
# stages (default: all, in this order): xdev codec tests probe unet fasdiff decode
# Then here: untar $OUT/xdev.tar into .gpu/xdev, run cross_device_files.py run (both
# precisions) and compare.
#
# The image's python3 has jax (CUDA), flax, optax, torch (CUDA), scikit-image; the wheels add
# constriction, CompressAI 1.2.8 and what CompressAI imports that the image lacks.
set -u
OUT=${OUT:-/tmp/gpu_checks_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
lscpu | grep -E "Model name|^CPU\(s\)"
python3 -c "import jax, flax, torch, numpy; print('jax', jax.__version__, 'flax', flax.__version__,
'torch', torch.__version__, 'numpy', numpy.__version__, jax.devices())"

STAGES=${*:-xdev codec tests probe unet fasdiff decode}
for stage in $STAGES; do
case $stage in
xdev)
  echo "== files across devices (${PRECISIONS:=default highest})"
  for p in $PRECISIONS; do
    timeout 100 python3 benchmarks/cross_device_files.py run .gpu/xdev --precision $p \
      > "$OUT/xdev_$p.log" 2>&1 || { echo "xdev $p failed:"; tail -20 "$OUT/xdev_$p.log"; }
  done
  (cd .gpu/xdev && tar cf "$OUT/xdev.tar" gpu-*)
  python3 benchmarks/cross_device_files.py compare .gpu/xdev ;;
codec)
  echo "== ours vs CompressAI 1.2.8, both on the GPU"
  timeout ${CODEC_TIMEOUT:-270} python3 benchmarks/entropy_coding.py --rounds 2 --repeats ${REPEATS:-20} \
    --train-repeats 10 --torch-device cuda --compressai-python python3 \
    --out "$OUT/entropy_coding_gpu${FASDIFF_HS_PLACE:+_hs_$FASDIFF_HS_PLACE}.json" 2>&1 | tail -40 ;;
tests)
  echo "== hyperprior and entropy-model tests with JAX on the GPU"
  JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -x -p no:cacheprovider \
    tests/test_hyperprior.py tests/test_entropy_models.py 2>&1 | tail -15 ;;
probe)
  echo "== integer h_s as a float64 XLA program on the GPU vs the host"
  timeout 90 python3 benchmarks/hs_device_probe.py 2>&1 | tee "$OUT/hs_probe.log" | tail -8 ;;
unet)
  echo "== SD UNet (reduced SD-2.1 shape) vs diffusers, both on the GPU"
  JAX_PLATFORMS=cuda timeout 120 python3 benchmarks/sd_unet.py --torch_device cuda --skip_full \
    --repeats 10 2>&1 | tee "$OUT/sd_unet_gpu.log" | tail -12 ;;
fasdiff)
  echo "== FaSDiff train step (reduced SD-2.1 shape, 256 px, batch 8) on the GPU"
  JAX_PLATFORMS=cuda timeout 170 python3 benchmarks/fasdiff_step.py --skip_tiny --reduced_batch 8 \
    --repeats 5 2>&1 | tee "$OUT/fasdiff_step_gpu.log" | tail -8 ;;
decode)
  echo "== FaSDiff coding, images and files one at a time vs batched (reduced SD-2.1, 256 px) on the GPU"
  JAX_PLATFORMS=cuda timeout 170 python3 benchmarks/batched_coding.py --reduced --files 8 \
    --batches 2,4,8 --repeats 3 2>&1 | tee "$OUT/batched_coding_gpu.log" | grep '^{' ;;
*) echo "unknown stage $stage"; exit 2 ;;
esac
done
