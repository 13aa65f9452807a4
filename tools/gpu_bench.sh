#!/usr/bin/env bash
# The GPU throughput table of docs/benchmarks.md in one command, for the first time a GPU is at
# hand. From the repository root, on a CUDA machine where `pip install -e .` has been done:
#
#     bash tools/gpu_bench.sh            # 1200 synthetic images; IMAGES=N to change
#
# DINO at ViT-B/14 size (768 wide, depth 12, patch 14) at 224², random init, bf16 autocast:
# `python -m cdsam.bench --preset vitb14-224 --all-stages` at batch 16 and 256 on the packed
# loader, at batch 256 on the per-sample DataLoader path (the "before"), at batch 256 with
# train.compile, and with `optim.batch_size: auto` (each stage measures its own batch). Each prints, per stage: loader img/s alone, model step img/s alone (batches
# staged on the device), end to end img/s, the loader's share, GFLOP per image, TFLOP/s and MFU
# against the device's bf16 peak; the batch-256 run also profiles its staged steps (top ops,
# kernel launches per step, Chrome traces in $OUT/profile-batch256). JSON for each run goes to
# $OUT (default: gpu-bench/).
set -euo pipefail
images="${IMAGES:-1200}"
out="${OUT:-gpu-bench}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device: tools/gpu_bench.sh takes the GPU table (on a CPU, run" \
        "python -m cdsam.bench --all-stages)" >&2
    exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
run() {
    local name="$1"
    shift
    echo "== $name: python -m cdsam.bench --preset vitb14-224 --all-stages --images $images $*"
    python -m cdsam.bench --preset vitb14-224 --all-stages --images "$images" --json "$@" \
        > "$out/$name.json"
    python -c "import json, sys; from cdsam.bench import table; \
print(table(json.load(open(sys.argv[1]))))" "$out/$name.json"
}
run batch16 --batch-size 16
run batch256 --batch-size 256 --profile "$out/profile-batch256"
run batch256-per-sample --batch-size 256 --per-sample-loader
run batch256-compile --batch-size 256 --compile
run auto --batch-size auto
