"""A stage runs its own checkout's cdsam (the code DVC hashed), never an installed one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _copy(dst: Path, with_package: bool) -> None:
    shutil.copytree(REPO / "stages", dst / "stages")
    if with_package:
        shutil.copytree(REPO / "cdsam", dst / "cdsam",
                        ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.parametrize("stage", ["prepare", "train"])  # evaluate.py: the same lines
def test_a_stage_in_a_second_clone_runs_that_clones_edited_code(stage, tmp_path):
    clone = tmp_path / "clone"
    _copy(clone, with_package=True)
    with (clone / "cdsam" / "entry.py").open("a") as f:
        f.write("\nprint('edited entry.py of', __file__)\n")
    # cwd elsewhere too: neither the cwd nor the installed cdsam may decide which code runs
    out = subprocess.run([sys.executable, str(clone / "stages" / f"{stage}.py"), "--help"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"edited entry.py of {clone / 'cdsam' / 'entry.py'}" in out.stdout


def test_a_stage_without_a_package_beside_it_stops_with_one_line(tmp_path):
    _copy(tmp_path, with_package=False)
    out = subprocess.run([sys.executable, str(tmp_path / "stages" / "prepare.py")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prepare.py: imported cdsam from ")
    assert f"expected this checkout's {tmp_path / 'cdsam'}" in lines[0]


def test_a_tool_in_a_second_clone_runs_that_clones_code(tmp_path):
    """tools/*.py measure the code beside them, like the stages."""
    clone = tmp_path / "clone"
    _copy(clone, with_package=True)
    shutil.copytree(REPO / "tools", clone / "tools",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with (clone / "cdsam" / "checkout.py").open("a") as f:
        f.write("\nprint('edited checkout.py of', __file__)\n")
    out = subprocess.run([sys.executable, str(clone / "tools" / "checkpoint_sizes.py"), "--help"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"edited checkout.py of {clone / 'cdsam' / 'checkout.py'}" in out.stdout
    bare = tmp_path / "bare"
    shutil.copytree(REPO / "tools", bare / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, str(bare / "tools" / "checkpoint_sizes.py"), "--help"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "next to tools/" in out.stderr
