#!/usr/bin/env bash
# Every check that needs a GPU, in one run (estimated 4-5 minutes on one H100; the previous version, without
# the MLP run, took 230 s): the CUDA tests, then the CUDA benchmarks at the settings: the
# parameter-heavy regime (two wide MLP encoders, batch 8, with the phase breakdown and every
# through-Lightning row), 2x ResNet-18 at CREMA-D shapes, batch 64 (breakdown, Lightning, scaling), and
# its peak memory by batch size.
# Usage: bash benchmarks/gpu_checks.sh [OUTPUT_DIR]   (from the repository root, with the project installed)
# Output (5 files, each written as soon as its command measures something, so a run stopped by a time
# limit keeps its partial tables): test_gpu.txt, cuda_wide_mlp.md, cuda.md, cuda_memory.md, durations.txt.
set -uo pipefail
out=${1:-gpu_results}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" || exit 1
status=0
run() {  # run NAME COMMAND...: the command's wall time goes to durations.txt
    local start=$SECONDS
    "${@:2}" || status=1
    echo "$1: $((SECONDS - start)) s (exit status so far: $status)" | tee -a "$out/durations.txt"
}
gpu_tests() {
    python -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_rule.py tests/test_fsdp.py 2>&1 \
        | tee "$out/test_gpu.txt"
}
run tests gpu_tests
# The parameter-heavy regime: every through-Lightning row (the callback's parts), no scaling table.
run wide-mlp python benchmarks/step_time.py --device cuda --model wide-mlp --breakdown --encoders \
    --markdown "$out/cuda_wide_mlp.md"
# ResNet-18: the Lightning rows that compare methods (the callback's parts are read off the MLP run).
run resnet18 python benchmarks/step_time.py --device cuda --breakdown \
    --lightning-variants uniform mmpareto manual-engine authors callback-uniform --markdown "$out/cuda.md"
run memory python benchmarks/step_time.py --device cuda --memory-only --memory-batch-sizes 16 32 64 \
    --markdown "$out/cuda_memory.md"
exit $status
