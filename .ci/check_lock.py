"""Compare the md5 of every data/ and models/ output in dvc.lock against git HEAD's dvc.lock."""

from __future__ import annotations

import subprocess
import sys

import yaml


def outs(lock: dict) -> dict[str, str]:
    found = {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out["path"].startswith(("data/", "models/")):
                found[out["path"]] = out["md5"]
    return found


def main() -> int:
    committed = outs(yaml.safe_load(subprocess.check_output(["git", "show", "HEAD:dvc.lock"])))
    with open("dvc.lock") as fh:
        fresh = outs(yaml.safe_load(fh))
    bad = [p for p in committed if committed[p] != fresh.get(p)]
    for p in sorted(committed):
        print(f"{'ok ' if p not in bad else 'DIFF'} {p} {committed[p]} {fresh.get(p)}")
    if bad or not committed:
        print(f"dvc.lock outputs not reproduced: {bad or 'none committed'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
