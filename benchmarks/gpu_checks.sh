#!/usr/bin/env bash
# Every check that needs a GPU, in one run: the CUDA tests, then the CUDA benchmark at the issue's
# setting (2x ResNet-18, CREMA-D shapes, batch 64) and its peak memory by batch size.
# Usage: bash benchmarks/gpu_checks.sh [OUTPUT_DIR]   (from the repository root, with the project installed)
set -uo pipefail
out=${1:-gpu_results}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
status=0
python -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt" || status=1
python benchmarks/step_time.py --device cuda --breakdown --markdown "$out/cuda.md" || status=1
python benchmarks/step_time.py --device cuda --memory-only --memory-batch-sizes 16 32 64 \
    --markdown "$out/cuda_memory.md" || status=1
exit $status
