#!/bin/bash
# Prompt ensembling vs one template, one run per data set: the pipeline's stage scripts in a
# scratch copy of this checkout with `prepare.prompt_templates` set; the evaluate stage then
# scores every stage's class grid with the mean over the templates (class_iou) and with the
# first template alone (class_iou_one_template). Sets: syn (the embedded default) and voc (the
# shared VOC samples, ../shared/real-data/voc-samples, copied into the scratch folder only).
#
#   bash tools/template_compare.sh [SCRATCH] [syn] [voc]      # ~10 min for syn on 2 cores
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
SCRATCH=${1:-/tmp/cdsam-templates}
shift || true
SETS=${*:-syn voc}
for set in $SETS; do
  D=$SCRATCH/$set
  rm -rf "$D" && mkdir -p "$D"
  (cd "$SRC" && tar cf - --exclude=./.git --exclude=./data/prepared --exclude=./models \
      --exclude=./metrics --exclude=./.dvc/cache .) | (cd "$D" && tar xf -)
  cd "$D"
  case $set in
    syn) templates='["a {}", "a photo of a {}", "a drawing of a {}"]' ;;
    voc) templates='["a photo of a {}", "a photo of the {}", "a picture of a {}"]'
         mkdir -p data/raw/voc && cp -r "$SRC/../shared/real-data/voc-samples/." data/raw/voc/
         sed -i 's|^  source: synthetic |  source: voc |; s|^  root: null |  root: data/raw/voc |' \
             params.yaml ;;
    *) echo "unknown set $set (syn | voc)" >&2; exit 2 ;;
  esac
  sed -i "s|^  prompt_templates: null|  prompt_templates: $templates|" params.yaml
  python stages/prepare.py --no-progress
  for n in 1 2 3 4; do python stages/train.py --stage "$n" --no-progress; done
  python stages/evaluate.py
  python - "$set" <<'PY'
import json, sys
m = json.load(open("metrics/evaluate.json"))
print(f"| {sys.argv[1]} | " + " | ".join(
    f"{m[s]['class_iou_one_template']:.3f} → {m[s]['class_iou']:.3f}"
    for s in ("stage1", "stage2", "stage3", "stage4")) + " |")
PY
done
