#!/usr/bin/env bash
# The performance ratios on a GPU machine, in one go: the embedded model at its native size, then a
# real-size Stable Diffusion 1.5 (random weights from config) at 512 px, in float16 on CUDA.
#
#   bash bench/gpu.sh [--quick]        # --quick: fewer concepts and images, a few minutes
#
# Needs the project installed (pip install -e .) with a CUDA build of torch. Prints what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."

concepts="1,5,10,20,50,100"
sd_concepts="1,5,10"
images=4
if [[ "${1:-}" == "--quick" ]]; then
  concepts="1,5,10"
  sd_concepts="1,5"
  images=2
fi

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: run bench/performance.py on the CPU instead")
print(torch.cuda.get_device_name(0))
PY

echo "== embedded model, CUDA, float32 (its native size)"
python bench/performance.py --model embedded --device cuda --dtype float32 --concepts "$concepts" \
  --probe-images "$images"

echo "== real-size Stable Diffusion 1.5 (random weights), CUDA, float16, 512 px"
python bench/performance.py --model sd15 --device cuda --dtype float16 --size 512 --concepts "$sd_concepts" \
  --probe-images "$images" --probe-steps 25
