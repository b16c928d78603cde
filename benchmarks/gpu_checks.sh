#!/usr/bin/env bash
# Every check that needs a GPU, in one call of under 4 minutes on one H200 (estimate: 3-3.5 minutes):
#   1. 2x ResNet-18 at CREMA-D shapes, batch 64: plain and through Lightning (target <= 1.70x uniform),
#      the authors' procedure beside them, the phase breakdown, the peak memory at batch 64 (target <=
#      1.17x uniform), the ATen operators per step, and the CUDA kernels of one `engine.integrate()`
#      call and of one whole step of each method (torch.profiler);
#   2. the fine-tuning regime: 2x BERT-base (BertModel(BertConfig()), random weights), batch 8,
#      sequence 128 (target <= 1.8x), with the same tables;
#   3. the parameter-heavy regime: two wide MLP encoders, batch 8 (target <= 2.0x), with the callback's
#      parts as through-Lightning rows;
#   4. the CUDA tests (every tests/test_*.py with a `gpu` mark, run with `-m gpu`).
# No scaling table and no memory sweep (they do not fit); fewer steps than the CPU defaults.
#
# Usage: bash benchmarks/gpu_checks.sh [OUTPUT_DIR]
#   Needs torch, lightning, torchvision and transformers; the repository's own package is put first on
#   PYTHONPATH, so nothing needs installing (jsonargparse is not needed).
#   GPU_CHECKS_BUDGET_S (default 225): the seconds all parts share; a part still running when they are
#   spent is stopped (its tables measured so far stay in its file) and counts as failed.
#   GPU_CHECKS_PLAN=1: only print the commands, one per line (tests/test_benchmark_smoke.py parses them).
# Output, each file written as soon as its part measures something: test_gpu.log, cuda_resnet18.md,
# cuda_bert.md, cuda_wide_mlp.md, a .log per part (its console output), durations.txt. The exit status
# is non-zero if any part failed or ran out of time; a summary of the tables is printed last.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-gpu_results}
budget=${GPU_CHECKS_BUDGET_S:-225}
plan=${GPU_CHECKS_PLAN:-0}
if [[ $plan != 1 ]]; then
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
fi
cd "$root" || exit 1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [[ $plan != 1 ]]; then
    python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check')" \
        || exit 1
    : >"$out/durations.txt"
fi
status=0
start_all=$SECONDS

run() {  # run NAME COMMAND...: console output to NAME.log, wall time to durations.txt, within the budget
    if [[ $plan == 1 ]]; then
        printf '%q ' "${@:2}"
        echo
        return
    fi
    local name=$1 start=$SECONDS left=$((budget - (SECONDS - start_all)))
    if ((left < 10)); then
        echo "$name: not started, the ${budget} s budget is spent" | tee -a "$out/durations.txt"
        status=1
        return
    fi
    timeout --kill-after=5 "$left" "${@:2}" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    local note=""
    if ((rc == 124 || rc == 137)); then
        note=", stopped by the ${budget} s budget"
    fi
    ((rc == 0)) || status=1
    echo "$name: $((SECONDS - start)) s (exit status $rc$note)" | tee -a "$out/durations.txt"
}

bench=(python benchmarks/step_time.py --device cuda)
# 65 rounds of 180 ms (30 + 55 + 95 ms) for the plain steps, the same for the Lightning rows and the
# breakdown; the memory pass, the operator counts and the profiler a few seconds each.
run resnet18 "${bench[@]}" --model resnet18 --iters 30 --warmup 5 --breakdown --encoders \
    --lightning-variants uniform mmpareto manual-engine authors --markdown "$out/cuda_resnet18.md"
# About 1.1 TFLOP per uniform step in fp32 (TF32 off, PyTorch's default for matmuls): ~25-35 ms. The
# operator counts are the CPU's measure (ResNet-18's above); the kernel counts stay.
run bert "${bench[@]}" --model bert --iters 20 --warmup 3 --breakdown --encoders --no-op-counts \
    --lightning-variants uniform mmpareto authors --markdown "$out/cuda_bert.md"
# Steps of 3-11 ms: more of them; the finite check's cost and the engine without the callback as rows.
run wide_mlp "${bench[@]}" --model wide-mlp --iters 100 --warmup 10 --breakdown --encoders --no-op-counts \
    --lightning-variants uniform mmpareto no-finite-check manual-engine authors --markdown "$out/cuda_wide_mlp.md"
# The CUDA tests last: the benchmarks' own correctness pre-check already guards their tables, and a slow
# compile in a test must not cost them their time.
mapfile -t gpu_test_files < <(grep -l 'mark\.gpu' tests/test_*.py)
run test_gpu python -m pytest -q -rs -p no:cacheprovider -m gpu "${gpu_test_files[@]}"
[[ $plan == 1 ]] && exit 0

echo "total: $((SECONDS - start_all)) s (exit status $status)" | tee -a "$out/durations.txt"
# The summary: what to read first, short enough to stay in a console's tail.
python - "$out" <<'EOF'
import pathlib
import sys

out = pathlib.Path(sys.argv[1])
KEEP_LINES = ("model:", "target:", "no step-time target", "peak / uniform", "mmpareto step - uniform step", "FAILED")
KEEP_TABLES = ("## Step time", "## Through Lightning", "## ATen operators", "## CUDA kernels")
print("\n==== summary")
tests = out / "test_gpu.log"
if tests.exists():
    lines = [line for line in tests.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"\ntests: {lines[-1] if lines else 'no output'}")
for name in ("cuda_resnet18.md", "cuda_bert.md", "cuda_wide_mlp.md"):
    path = out / name
    if not path.exists():
        print(f"\n{name}: missing")
        continue
    print(f"\n### {name}")
    table, in_table = False, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            table, in_table = line.startswith(KEEP_TABLES), False
            if table:
                print(line)
        elif line.startswith("correctness pre-check"):
            print(line.split(":")[0])
        elif line.startswith(KEEP_LINES):
            print(line)
        elif table and line.startswith("|"):
            in_table = True
            print(line)
        elif in_table and not line.startswith("|"):
            table = in_table = False  # only the first table of a section
print()
print((out / "durations.txt").read_text(encoding="utf-8"))
EOF
exit $status
