"""Write dvc.yaml: the stages, their params keys, and as code deps exactly the modules each
stage script imports (found by importing it in a fresh interpreter).

    python tools/dvc_yaml.py           # rewrite dvc.yaml after adding/removing an import
    python tools/dvc_yaml.py --check   # exit 1 when dvc.yaml is not what this writes

Every training stage gets the same code list, so the 30-line lists are written here once
instead of copied into five stages by hand; tests/test_config.py runs ``--check``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's stage table, not an installed cdsam's
from cdsam.config.stages import (  # noqa: E402
    stage_keys,
    stage_rule,
    stages,
    without_speed_keys,
)

MODEL_DATA = "cdsam/models/configs"  # the shipped tiny CLIP config, read where models are built
# The held-out phrases of the text-drift figures, read where they are measured.
DRIFT_WORDS = "cdsam/evaluation/drift_words.txt"
# Folders the user's inputs live in, so DVC sees a replaced file (cdsam.config.stage_view refuses
# params that name files elsewhere): weight files for every stage that builds the model (delta
# checkpoints rebuild their base), raw data for prepare.
WEIGHTS = "weights"
RAW_DATA = "data/raw"

HEADER = """\
# prepare -> stage1 -> stage2 -> stage3 -> stage4 -> evaluate
# Written by `python tools/dvc_yaml.py` (edit that, then rerun it). Each stage lists exactly
# the params keys its script reads (cdsam.config.stage_view enforces it), so
# `dvc exp run -S lora.dino.last_k_blocks=6` reruns stage2 onwards and nothing else, and exactly
# the cdsam modules its script imports, so an edit reruns only the stages that run that code.
"""

PLOTS = """\
plots:
  - Loss per epoch (val):
      template: linear
      x: step
      y:
{val_loss}
  - mIoU per epoch (val):
      template: linear
      x: step
      y:
{val_miou}
  - Train vs val loss per epoch (same loss weights):
      template: linear
      x: step
      y:
        metrics/stage1/plots/metrics/train/loss.tsv: loss
        metrics/stage1/plots/metrics/val/loss.tsv: loss
        metrics/stage4/plots/metrics/train/loss.tsv: loss
        metrics/stage4/plots/metrics/val/loss.tsv: loss
  - False-positive rate on absent-object prompts per epoch (val):
      template: linear
      x: step
      y:
{val_fp}
"""


def imported_modules(script: str) -> list[str]:
    """The cdsam source files ``script`` imports (its ``--help`` path; nothing runs)."""
    code = (f"import runpy, sys, json; sys.argv=['x', '--help']\n"
            f"try:\n    runpy.run_path({str(REPO / script)!r}, run_name='not_main')\n"
            f"except SystemExit: pass\n"
            f"print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items() "
            f"if n.split('.')[0] == 'cdsam' and getattr(m, '__file__', None))))")
    out = subprocess.check_output([sys.executable, "-c", code], cwd=REPO, text=True)
    files = json.loads(out.strip().splitlines()[-1])
    return sorted(Path(f).resolve().relative_to(REPO).as_posix() for f in files)


def code_deps(script: str) -> list[str]:
    mods = imported_modules(script)
    return [script, *mods] + ([MODEL_DATA] if "cdsam/models/model.py" in mods else []) + \
        ([DRIFT_WORDS] if "cdsam/evaluation/text_drift.py" in mods else [])


def _list(key: str, items: list[str]) -> str:
    return f"    {key}:\n" + "".join(f"      - {i}\n" for i in items)


def _metrics(path: str) -> str:
    return f"    metrics:\n      - {path}:\n          cache: false\n"


def stage_text(name: str, cmd: str, deps: list[str], params: list[str], outs: list[str],
               metrics: str, plots: str = "") -> str:
    text = f"  {name}:\n    cmd: {cmd}\n" + _list("deps", deps) + _list("params", params)
    if outs:
        text += _list("outs", outs)
    return text + _metrics(metrics) + plots


def render() -> str:
    prepare, train, evaluate = (code_deps(f"stages/{s}.py")
                                for s in ("prepare", "train", "evaluate"))
    parts = [stage_text("prepare", "python stages/prepare.py", prepare + [RAW_DATA],
                        without_speed_keys(["seed", "prepare", "data.fit", "data.resize",
                                            "data.crop"]),
                        ["data/prepared"], "metrics/prepare.json")]
    for n in stages():
        rule = stage_rule(n)
        parent = [WEIGHTS, "data/prepared"] + \
            ([] if rule.parent is None else [f"models/stage{rule.parent}"])
        plots = (f"    plots:\n      - metrics/stage{n}/plots/metrics:\n"
                 f"          cache: false\n")
        parts.append(stage_text(f"stage{n}", f"python stages/train.py --stage {n}",
                                train + parent, stage_keys(n), [f"models/stage{n}"],
                                f"metrics/stage{n}/metrics.json", plots))
    eval_plots = ("    plots:\n"
                  "      - metrics/eval/stages.csv:\n          cache: false\n"
                  "          template: bar_horizontal\n          x: miou\n          y: stage\n"
                  "      - metrics/eval/per_prompt.csv:\n          cache: false\n"
                  "      - metrics/eval/overlays:\n          cache: false\n")
    parts.append(stage_text("evaluate", "python stages/evaluate.py",
                            evaluate + [WEIGHTS, "data/prepared"] + [f"models/stage{n}" for n in
                                                            stages()],
                            without_speed_keys(["seed", "device", "data", "evaluate"]), [],
                            "metrics/evaluate.json", eval_plots))

    def curve(name: str) -> str:
        return "\n".join(f"        metrics/stage{n}/plots/metrics/val/{name}.tsv: {name}"
                         for n in stages())

    plots = PLOTS.format(val_loss=curve("loss"), val_miou=curve("miou"), val_fp=curve("fp_rate"))
    return HEADER + "stages:\n" + "\n".join(parts) + "\n" + plots


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare, do not write")
    args = ap.parse_args()
    text, path = render(), REPO / "dvc.yaml"
    if args.check:
        if path.read_text() != text:
            print(f"{path}: differs from what tools/dvc_yaml.py writes; run it", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
