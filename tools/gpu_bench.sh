#!/usr/bin/env bash
# The GPU throughput table of docs/benchmarks.md in one command, for a session with a GPU at
# hand. From the repository root, on a CUDA machine where `pip install -e .` has been done (or
# cdsam is on PYTHONPATH):
#
#     bash tools/gpu_bench.sh            # 1200 synthetic images; IMAGES=N to change
#
# DINO at ViT-B/14 size (768 wide, depth 12, patch 14) at 224², random init, bf16 autocast:
# `python -m cdsam.training.bench --preset vitb14-224 --all-stages`, four runs, each under its own time
# limit so that the whole stays under 8 minutes (a run past its limit is named and skipped):
#   batch256  batch 256, the step alone over 100 steps, epochs lengthened to 100 timed steps,
#             profiled (top ops, kernel launches, host waits and forward/backward/optimizer
#             host time per step; Chrome traces in $OUT/profile-batch256)
#   batch16   batch 16, the same, and the step alone again with the frozen weights in fp32
#             (cast by autocast each step) against their bf16 copies (--cast-frozen)
#   compile   batch 256 with train.compile: the step alone compiled and eager in one run (a
#             compiler failure falls back to eager in one log line)
#   auto      optim.batch_size: auto (each stage measures its batch; the cap is
#             optim.auto_batch_max, 1024)
# Each prints, per stage: loader img/s alone, model step img/s alone (batches staged on the
# device), end to end img/s, the loader's share, GFLOP per image, TFLOP/s, MFU against the
# device's bf16 peak and host waits per step. JSON for each run goes to $OUT (default
# gpu-bench/), its log to $OUT/NAME.log.
set -uo pipefail
images="${IMAGES:-1200}"
out="${OUT:-gpu-bench}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device: tools/gpu_bench.sh takes the GPU table (on a CPU, run" \
        "python -m cdsam.training.bench --all-stages)" >&2
    exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
start=$SECONDS
failed=0
run() {
    local name="$1" limit="$2"
    shift 2
    echo "== $name (limit ${limit}s): python -m cdsam.training.bench --preset vitb14-224 --all-stages" \
        "--images $images $*"
    if ! timeout "$limit" python -m cdsam.training.bench --preset vitb14-224 --all-stages \
        --images "$images" --json "$@" > "$out/$name.json" 2> "$out/$name.log"; then
        echo "$name: did not finish within ${limit}s or failed; last lines of $out/$name.log:"
        grep -v "^\s*$" "$out/$name.log" | tail -5
        failed=1
        return
    fi
    grep -i "train.compile\|warning" "$out/$name.log" | sort -u | head -5
    python -c "import json, sys; from cdsam.training.bench import table; \
print(table(json.load(open(sys.argv[1]))))" "$out/$name.json"
}
run batch256 170 --batch-size 256 --steps 100 --profile "$out/profile-batch256"
run batch16 100 --batch-size 16 --steps 100 --cast-frozen
run compile 120 --batch-size 256 --steps 30 --compile
run auto 80 --batch-size auto --steps 20
echo "gpu_bench.sh: $((SECONDS - start)) s"
exit $failed
