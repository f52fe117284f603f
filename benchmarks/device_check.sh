#!/usr/bin/env bash
# The GPU path of clmtl, checked on a machine with CUDA in one short run (about 10 minutes on one recent GPU):
#   1. the tests marked gpu (mixed-precision training on CUDA: bf16 and fp16 with the gradient scaler), and the
#      explicit-device test of every strategy, eval, export and resume, on cuda;
#   2. the default `clmtl run` on train.device=cuda, timed;
#   3. benchmarks/speed.py on the GPU: latency of each task and of forward_all at 512 px, batch 1, against the bare
#      backbone, and the training step of each strategy;
#   4. a 2-GPU torchrun run (NCCL), if two GPUs are present.
# Usage: bash benchmarks/device_check.sh [OUT]   (default OUT=runs/device_check; everything it measured goes there)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/device_check}
mkdir -p "$OUT"
export YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: this check needs one'; print(torch.cuda.get_device_name(0))" \
    | tee "$OUT/device.txt"

echo "== 1. tests marked gpu, and every strategy / eval / export / resume on cuda"
$PY -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/tests_gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tee "$OUT/tests_devices.txt"

echo "== 2. the default clmtl run on cuda"
start=$(date +%s)
$PY -m clmtl run --out "$OUT/default_run" train.device=cuda 2>&1 | tail -40 | tee "$OUT/default_run.txt"
echo "default run: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/default_run.txt"

echo "== 3. speed on the GPU"
$PY benchmarks/speed.py --device cuda --out "$OUT/speed" 2>&1 | tail -60 | tee "$OUT/speed.txt"

echo "== 4. torchrun on two GPUs"
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    start=$(date +%s)
    $PY -m torch.distributed.run --nproc_per_node=2 -m clmtl run --no-baselines --out "$OUT/torchrun" \
        train.device=cuda 2>&1 | tail -20 | tee "$OUT/torchrun.txt"
    echo "torchrun, 2 GPUs: $(( $(date +%s) - start )) s wall" | tee -a "$OUT/torchrun.txt"
else
    echo "one GPU: skipped" | tee "$OUT/torchrun.txt"
fi
echo "wrote $OUT"
