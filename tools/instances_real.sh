#!/bin/bash
# The instance heads against the components baseline on the shared real sets: the pipeline's
# stage scripts in a scratch copy of this checkout, the evaluate stage's test figures per stage
# for both evaluate.instances.decode paths, prompts and watershed (each at the min_quality
# the stage chose on val), and watershed with evaluate.instances.min_quality 0
# (docs/real-data.md, "Instances"). Sets: nuclei (DSB 2018 subset, instance-id masks, "a
# nucleus") and em (ISBI 2012 slices, prepare.instances_from: components, "a cell"), both
# copied into the scratch folder only, at data.crop CROP (default 256) with data.augment on,
# EPOCHS epochs a stage (default 40) and BATCH images a step (default 4).
#
#   bash tools/instances_real.sh [SCRATCH] [SETS...]   # env CROP=256 EPOCHS=40 BATCH=4
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
REAL=${CDSAM_REAL_DATA:-$SRC/../shared/real-data}
SCRATCH=${1:-/tmp/cdsam-instances}
shift || true
SETS=${*:-nuclei em}
CROP=${CROP:-256}
EPOCHS=${EPOCHS:-40}
BATCH=${BATCH:-4}
# shellcheck source=tools/scratch_set.sh
. "$SRC/tools/scratch_set.sh"
echo "| set | decode, min_quality | stage | mIoU | AP | AP50 | count error | pmF1 | components AP | components AP50 | components count error |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for set in $SETS; do
  case $set in nuclei | em) ;; *) echo "unknown set $set (nuclei | em)" >&2; exit 2 ;; esac
  scratch_set "$SRC" "$REAL" "$SCRATCH/$set" "$set"
  if [ "$set" = em ]; then  # the EM slices' cells are the pieces of the cell mask
    sed -i 's|^  instances_from: objects |  instances_from: components |' params.yaml
  fi
  sed -i '/^  augment:/,/^  [a-z_]*:.*$/ s|^    enable: false|    enable: true|' params.yaml
  sed -i "s|^  resize: 64 |  resize: $CROP |; s|^  crop: 64 |  crop: $CROP |; s|^    img_size: 64$|    img_size: $CROP|" params.yaml
  # One prompt an image and ~18 training images: BATCH images a step gives an epoch a few
  # steps (16 would be one or two).
  sed -i "s|^  batch_size: [0-9a-z]* |  batch_size: $BATCH |" params.yaml
  sed -i "s|^  epochs: [0-9]*$|  epochs: $EPOCHS|" params.yaml
  grep -q "^  crop: $CROP " params.yaml && grep -q "^    img_size: $CROP$" params.yaml
  python stages/prepare.py --no-progress > log.txt 2>&1
  for n in 1 2 3 4; do python stages/train.py --stage "$n" --no-progress >> log.txt 2>&1; done
  python stages/evaluate.py >> log.txt 2>&1
  sed -i 's|^    decode: prompts |    decode: watershed |' params.yaml
  grep -q "^    decode: watershed " params.yaml
  python stages/evaluate.py --metrics metrics/evaluate_watershed.json \
    --out metrics/eval_watershed >> log.txt 2>&1
  sed -i 's|^    min_quality: null |    min_quality: 0.0 |' params.yaml
  grep -q "^    min_quality: 0.0 " params.yaml
  python stages/evaluate.py --metrics metrics/evaluate_watershed_q0.json \
    --out metrics/eval_watershed_q0 >> log.txt 2>&1
  python - "$set" <<'PY'
import json, sys
for decode, path in (("prompts, val's", "metrics/evaluate.json"),
                     ("watershed, val's", "metrics/evaluate_watershed.json"),
                     ("watershed, 0", "metrics/evaluate_watershed_q0.json")):
    m = json.load(open(path))
    for s in ("stage1", "stage2", "stage3", "stage4"):
        e, c = m[s], m[s]["components"]
        print(f"| {sys.argv[1]} | {decode} | {s[-1]} | {e['miou']:.3f} | {e['ap']:.3f} | "
              f"{e['ap50']:.3f} | {e['count_mae']:.1f} | {e['pmf1']:.3f} | {c['ap']:.3f} | "
              f"{c['ap50']:.3f} | {c['count_mae']:.1f} |")
PY
done
