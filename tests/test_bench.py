"""python -m cdsam.training.bench (the where-does-a-step-go split) and tools/scale_bench.py, on tiny
inputs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdsam.training import bench
from tests.conftest import TINY


@pytest.mark.slow
def test_bench_splits_loader_step_and_flops_for_both_loaders(tmp_path, monkeypatch):
    params = tmp_path / "params.yaml"
    # Rows either way (the per-sample loader yields rows): the same batches, the same FLOPs.
    params.write_text(yaml.safe_dump({**TINY, "device": "cpu",
                                      "data": {**TINY["data"], "batch_by": "sample"},
                                      "prepare": {"synthetic": {"image_size": 32}}}))
    monkeypatch.setattr(bench, "STAGED_BATCHES", 2)
    runs = {}
    for per_sample in (False, True):
        prof = None if per_sample else tmp_path / "profile"
        steps = None if per_sample else 5  # --steps: timed over 5, epochs lengthened to hold 5
        r = bench.run(str(params), images=16, epochs=2, preset="default", show=False,
                      batch_size=8, peak_tflops=1.0, per_sample=per_sample, profile_dir=prof,
                      steps=steps)
        assert r["loader"] == ("per-sample" if per_sample else "packed")
        assert r["batch_size"] == 8 and r["max_loss_diff"] == 0.0
        for key in ("stage1_uncached", "stage1_cached", "stage2_uncached", "stage2_cached"):
            row = r[key]
            assert row["packed"] is not per_sample
            assert row["loader_images_s"] > 0 and row["step_images_s"] > 0
            assert 0 < row["loader_share"] < 1
            assert row["flop_per_image"] > 0 and row["mfu"] == row["tflop_s"]  # peak 1 TFLOP/s
            assert row["syncs_per_step"] is None and not row["compiled"]  # CUDA only; eager
            if steps:
                assert row["timed_steps"] == steps
                assert (row["epochs"] - 1) * row["steps_per_epoch"] >= steps
            else:
                assert row["timed_steps"] == 2 * bench.STAGED_BATCHES and row["epochs"] == 2
            if prof is not None:  # --profile: a trace per run and its top ops
                assert Path(row["profile"]["trace"]) == prof / f"{key.replace('_', '-')}.json"
                assert Path(row["profile"]["trace"]).is_file() and row["profile"]["top_ops"]
            else:
                assert "profile" not in row
        runs[per_sample] = r
        text = bench.table(r)
        assert "where a step goes" in text and "stage2_cached" in text
        assert ("profile of the staged steps" in text) is (prof is not None)
        assert ("timed over 5 steps" in text) is (steps == 5)
    # The same batches either way: the same FLOPs per image.
    for key in ("stage1_cached", "stage2_uncached"):
        assert runs[False][key]["flop_per_image"] == runs[True][key]["flop_per_image"]


@pytest.mark.slow
def test_scale_bench_measures_each_size_in_a_dvc_project(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "scale_bench.py"
    out = subprocess.run([sys.executable, str(tool), "--images", "12", "24", "--size", "32",
                          "--batch", "4", "--epoch-steps", "2", "--work", str(tmp_path),
                          "--json", str(tmp_path / "rows.json")],
                         check=True, capture_output=True, text=True)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["images"] for r in rows] == [12, 24] and "peak RSS MB" in out.stdout
    assert rows[0]["files"] < 12 + 12 and rows[1]["files"] < 12 + 24  # shards + test scenes
    assert rows[1]["mb"] > rows[0]["mb"] and rows[1]["samples"] > rows[0]["samples"]
    assert all(r["steps"] == 2 and r["rss_mb"] > 0 for r in rows)


def test_batch_size_arg_reads_as_the_params_key_does():
    assert bench.batch_size_arg("auto") == "auto"
    assert bench.batch_size_arg("32") == 32
    for bad in ("0", "-4", "big"):
        with pytest.raises(argparse.ArgumentTypeError, match="optim.batch_size"):
            bench.batch_size_arg(bad)


@pytest.mark.slow
def test_bench_compares_sample_and_image_major_stages(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**TINY, "device": "cpu",
                                      "prepare": {"synthetic": {"image_size": 32}}}))
    r = bench.run(str(params), images=16, epochs=2, preset="default", show=False,
                  batch_size=8, batch_by_compare=True, negatives_per_image=3)
    assert r["mode"] == "batch_by_compare" and r["prompts_per_image"] > 3
    images_b = max(1, round(8 / r["prompts_per_image"]))
    for stage in (2, 3, 4):
        sample, image = r[f"stage{stage}_sample"], r[f"stage{stage}_image"]
        assert (sample["batch_by"], sample["batch_size"]) == ("sample", 8)
        assert (image["batch_by"], image["batch_size"]) == ("image", images_b)
        # Every sample trained either way: samples/s over images/s is the mean prompts.
        for row in (sample, image):
            ratio = row["images_s"] / row["distinct_images_s"]
            assert ratio == pytest.approx(r["prompts_per_image"])
        assert r[f"stage{stage}_speedup"] == image["images_s"] / sample["images_s"]
    text = bench.batch_by_table(r)
    assert "stage4 image" in text and f"{images_b} images" in text
