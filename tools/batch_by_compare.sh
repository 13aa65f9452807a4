#!/bin/bash
# data.batch_by: sample vs image at equal epochs, one row per (set, mode): the pipeline's stage
# scripts in a scratch copy of this checkout, the evaluate stage's test figures and the wall
# time of stages 1-4 + evaluate (prepare is the same for every mode and not counted).
# Modes: sample (optim.batch_size 16 rows, today's), image (16 images with all their prompts),
# image4 (4 images: about 16 samples a step, as many steps as sample). Sets: syn (the
# embedded default), voc / em / nuclei (../shared/real-data, copied into the scratch folder
# only; data.augment on, as docs/real-data.md runs them).
#
#   bash tools/batch_by_compare.sh [SCRATCH] [SETS...]     # ~30 min for all four on 2 cores
# Run it on an idle machine: the wall column is the quality-per-minute comparison.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
REAL=${CDSAM_REAL_DATA:-$SRC/../shared/real-data}
SCRATCH=${1:-/tmp/cdsam-batch-by}
shift || true
SETS=${*:-syn voc em nuclei}
# shellcheck source=tools/scratch_set.sh
. "$SRC/tools/scratch_set.sh"
echo "| set | mode | batch | samples/s stage 4 | test mIoU stage 1 / 2 / 3 / 4 | class IoU stage 4 | wall s |"
echo "|---|---|---|---|---|---|---|"
for set in $SETS; do
  for mode in sample image image4; do
    scratch_set "$SRC" "$REAL" "$SCRATCH/$set-$mode" "$set"
    if [ "$set" != syn ]; then
      # docs/real-data.md's settings for the shared sets: augmentation on.
      sed -i '/^  augment:/,/^  [a-z_]*:.*$/ s|^    enable: false|    enable: true|' params.yaml
    fi
    case $mode in
      sample) batch=16; by=sample ;;
      image) batch=16; by=image ;;
      image4) batch=4; by=image ;;
    esac
    sed -i "s|^  batch_by: [a-z]* |  batch_by: $by |; s|^  batch_size: [0-9a-z]* |  batch_size: $batch |" \
        params.yaml
    grep -q "^  batch_by: $by " params.yaml && grep -q "^  batch_size: $batch " params.yaml
    python stages/prepare.py --no-progress > log.txt 2>&1
    start=$(date +%s.%N)
    for n in 1 2 3 4; do python stages/train.py --stage "$n" --no-progress >> log.txt 2>&1; done
    python stages/evaluate.py >> log.txt 2>&1
    end=$(date +%s.%N)
    python - "$set" "$mode" "$batch" "$start" "$end" <<'PY'
import json, sys
set_, mode, batch, start, end = sys.argv[1:]
m = json.load(open("metrics/evaluate.json"))
s4 = json.load(open("metrics/stage4/metrics.json"))
unit = "rows" if mode == "sample" else "images"
print(f"| {set_} | {mode} | {batch} {unit} | {s4['throughput_img_s']:.0f} | "
      + " / ".join(f"{m[s]['miou']:.3f}" for s in ("stage1", "stage2", "stage3", "stage4"))
      + f" | {m['stage4']['class_iou']:.3f} | {float(end) - float(start):.0f} |")
PY
  done
done
