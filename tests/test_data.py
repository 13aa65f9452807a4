import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cdsam.config.schema import DataConfig, PrepareConfig, SyntheticConfig
from cdsam.data.dataset import ManifestDataset
from cdsam.data.manifest import FOREGROUND, IGNORE, slug
from cdsam.data.prepare import prepare
from cdsam.data.prepared import read_samples
from cdsam.data.shards import SAMPLE_COLUMNS
from cdsam.errors import DataError
from tests.conftest import prepared_arrays


def whole(side: int) -> DataConfig:
    """The pad fit at an image's longer side: masks keep their original pixels."""
    return DataConfig(fit="pad", crop=side)


def test_synthetic_manifest(tmp_path):
    cfg = PrepareConfig(synthetic=SyntheticConfig(num_images=40, image_size=48),
                        test_fraction=0.0, negatives="none")
    summary = prepare(cfg, seed=0, out=tmp_path / "p", show_progress=False, data=whole(48))
    df = read_samples(tmp_path / "p")
    assert list(df.columns) == SAMPLE_COLUMNS
    assert set(df["split"]) == {"train", "val"}
    assert df["prompt"].nunique() >= 4
    per_image = df.groupby("image")["prompt"].nunique()
    assert (per_image >= 2).all()
    assert not df["negative"].any()
    masks, _ = prepared_arrays(tmp_path / "p")
    for sid in df["id"].head(10):
        values = set(np.unique(masks[sid]))
        assert values <= {0, FOREGROUND} and FOREGROUND in values
    assert summary["images"] == 40
    # seeded: the same params give the same files, byte for byte
    prepare(cfg, seed=0, out=tmp_path / "q", show_progress=False, data=whole(48))
    for f in (tmp_path / "p").iterdir():
        assert f.read_bytes() == (tmp_path / "q" / f.name).read_bytes(), f.name


def test_distractors_share_colour_or_shape(tmp_path):
    prepare(PrepareConfig(synthetic=SyntheticConfig(num_images=20)), 1, tmp_path / "p",
            show_progress=False)
    df = read_samples(tmp_path / "p")
    for _, g in df.groupby("image"):
        words = [p.split()[1:] for p in g["prompt"]]
        colours = [w[0] for w in words]
        shapes = [w[1] for w in words]
        assert len(set(colours)) < len(colours) or len(set(shapes)) < len(shapes)


def test_four_object_scenes_make_both_cues_ambiguous(tmp_path):
    from cdsam.data.sources.synthetic import attributes

    prepare(PrepareConfig(synthetic=SyntheticConfig(num_images=30, min_objects=4,
                                                    max_objects=5)), 2, tmp_path / "p",
            show_progress=False)
    df = read_samples(tmp_path / "p")
    def both_kinds(objects: list[tuple[str, str]], c: str, s: str) -> bool:
        return (any(o[0] == c and o[1] != s for o in objects)
                and any(o[1] == s and o[0] != c for o in objects))

    for _, g in df[~df["negative"]].groupby("image"):
        objects = [attributes(p) for p in g["prompt"]]
        # The 2 x 2 core: four objects, each with a same-colour and a same-shape distractor.
        assert sum(both_kinds(objects, c, s) for c, s in objects) >= 4, objects


def _folders(tmp_path, n=6):
    img_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            img_dir / f"im{i}.jpg")
        m = np.zeros((20, 24), np.uint8)
        m[5:12, 6:15] = 200
        Image.fromarray(m).save(mask_dir / f"im{i}.png")
    return PrepareConfig(source="folders", images=str(img_dir), masks=str(mask_dir),
                         prompt="a lesion", val_fraction=0.34)


def test_folders_source(tmp_path):
    cfg = _folders(tmp_path)
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=whole(24))
    df = read_samples(tmp_path / "p")
    assert len(df) == 6 and set(df["prompt"]) == {"a lesion"}
    m = prepared_arrays(tmp_path / "p")[0][df["id"][0]]
    assert set(np.unique(m)) == {0, 1} and m.shape == (20, 24)


def test_folders_are_decoded_one_image_at_a_time(tmp_path, monkeypatch):
    """Memory stays flat in the image count: when the writer gets image k, only k images and
    their masks have been opened (holding them all first grew about 5 MB a 1024² image). One
    worker: in this process, where the counting can see it."""
    from cdsam.data.manifest import BadFiles
    from cdsam.data.shards import ShardWriter

    cfg = _folders(tmp_path, n=8)
    cfg.workers = 1
    opened, at_write = [], []
    real_open, real_add = BadFiles.open, ShardWriter.write

    def counting_open(self, *args, **kwargs):
        opened.append(args[0])
        return real_open(self, *args, **kwargs)

    def recording_add(self, *args, **kwargs):
        at_write.append(len(opened))
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(BadFiles, "open", counting_open)
    monkeypatch.setattr(ShardWriter, "write", recording_add)
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=whole(24))
    assert at_write == [2 * (k + 1) for k in range(8)]  # an image and its mask each


def _a_train_stem(cfg: PrepareConfig, stems: list[str]) -> str:
    """A stem the split puts in train (skipping it leaves val and test as they are)."""
    from cdsam.data.manifest import stable_splits

    splits = stable_splits(stems, cfg.val_fraction, cfg.test_fraction, 0)
    return next(s for s in stems if splits[s] == "train")


def test_truncated_png_named_or_skipped(tmp_path):
    cfg = _folders(tmp_path)
    stem = _a_train_stem(cfg, [f"im{i}" for i in range(6)])
    bad = tmp_path / "masks" / f"{stem}.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=rf"{stem}.png: unreadable mask"):
        prepare(cfg, 0, tmp_path / "p", show_progress=False)
    assert not (tmp_path / "p").exists()
    cfg.on_bad_file = "skip"
    summary = prepare(cfg, 0, tmp_path / "p", show_progress=False)
    assert summary["skipped_files"] == 1 and summary["images"] == 5


@pytest.mark.parametrize("case,match", [
    ("size", "mask is 10x10, its image is 24x20"),
    ("nomask", "no mask with the same stem"),
    ("badimage", "unreadable image"),
])
def test_folders_bad_inputs(tmp_path, case, match):
    cfg = _folders(tmp_path)
    if case == "size":
        Image.fromarray(np.full((10, 10), 255, np.uint8)).save(tmp_path / "masks" / "im1.png")
    elif case == "nomask":
        (tmp_path / "masks" / "im1.png").unlink()
    else:
        (tmp_path / "images" / "im1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=match):
        prepare(cfg, 0, tmp_path / "p", show_progress=False)


def test_existing_output_survives_a_failed_prepare(tmp_path):
    cfg = _folders(tmp_path)
    prepare(cfg, 0, tmp_path / "p", show_progress=False)
    before = {f.name: f.read_bytes() for f in (tmp_path / "p").iterdir()}
    (tmp_path / "masks" / "im1.png").unlink()
    with pytest.raises(DataError):
        prepare(cfg, 0, tmp_path / "p", show_progress=False)
    assert {f.name: f.read_bytes() for f in (tmp_path / "p").iterdir()} == before
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


def test_source_and_split_errors(tmp_path):
    with pytest.raises(DataError, match="prepare.images: folder not found"):
        prepare(PrepareConfig(source="folders", images=str(tmp_path / "x"),
                              masks=str(tmp_path), prompt="p"), 0, tmp_path / "p", False)
    cfg = _folders(tmp_path, n=1)
    cfg.test_fraction = 0.0
    with pytest.raises(DataError, match="split 'val' has no samples"):
        prepare(cfg, 0, tmp_path / "p", show_progress=False)
    with pytest.raises(DataError, match="prepare.root: required"):
        prepare(PrepareConfig(source="voc"), 0, tmp_path / "p", show_progress=False)


def _voc(tmp_path, with_sets=True):
    root = tmp_path / "VOC"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (3 * 253)
    palette[255 * 3:255 * 3 + 3] = [224, 224, 192]
    ids = []
    for i in range(4):
        stem = f"2007_{i:06d}"
        ids.append(stem)
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(
            root / "JPEGImages" / f"{stem}.jpg")
        lab = np.zeros((16, 16), np.uint8)
        lab[2:8, 2:8] = 15  # person
        lab[9:14, 9:14] = 12  # dog
        lab[8, :] = 255  # border
        im = Image.fromarray(lab, mode="P")
        im.putpalette(palette)
        im.save(root / "SegmentationClass" / f"{stem}.png")
    if with_sets:
        sets = root / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True)
        (sets / "train.txt").write_text("\n".join(ids[:3]) + "\n")
        (sets / "val.txt").write_text(ids[3] + "\n")
    return root


def test_voc_per_class_prompts_and_ignore(tmp_path):
    root = _voc(tmp_path)
    data = DataConfig(fit="crop", resize=16, crop=16)
    prepare(PrepareConfig(source="voc", root=str(root), negatives="none"), 0, tmp_path / "p",
            False, data=data)
    df = read_samples(tmp_path / "p")
    assert set(df["prompt"]) == {"a photo of a person", "a photo of a dog"}
    assert (df["split"] == "val").sum() == 2 and (df["split"] == "train").sum() == 6
    m = prepared_arrays(tmp_path / "p")[0][df["id"][0]]
    assert set(np.unique(m)) == {0, FOREGROUND, IGNORE}
    assert (m[8, :] == IGNORE).all()
    ds = ManifestDataset(tmp_path / "p", "val", data)
    s = ds[0]
    assert s["valid"][0, 8].sum() == 0 and s["mask"][0, 8].sum() == 0


def test_voc_binary_and_custom_classes(tmp_path):
    root = _voc(tmp_path, with_sets=False)
    cfg = PrepareConfig(source="voc", root=str(root), binary=True, prompt="a lesion",
                        val_fraction=0.25)
    prepare(cfg, 0, tmp_path / "p", False)
    df = read_samples(tmp_path / "p")
    assert set(df["prompt"]) == {"a lesion"} and len(df) == 4
    short = PrepareConfig(source="voc", root=str(root), classes=["a", "b"], val_fraction=0.25)
    with pytest.raises(DataError, match="label value 12 has no class name"):
        prepare(short, 0, tmp_path / "q", False)


def test_dataset_transform_and_manifest_errors(tmp_path):
    data = DataConfig(fit="crop", resize=36, crop=32)
    prepare(PrepareConfig(synthetic=SyntheticConfig(num_images=10, image_size=40),
                          test_fraction=0.0), 0, tmp_path / "p", False, data=data)
    ds = ManifestDataset(tmp_path / "p", "train", data)
    s = ds[0]
    assert s["image"].shape == (3, 32, 32) and s["mask"].shape == (1, 32, 32)
    assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(DataError, match="split 'test' has no samples"):
        ManifestDataset(tmp_path / "p", "test", data)
    with pytest.raises(DataError, match=r"index.json: not found \(run the prepare stage"):
        read_samples(tmp_path / "nothing")
    # A stage fitted otherwise than prepare did: one line naming the keys.
    with pytest.raises(DataError, match=r"data.resize: 40 \(prepared: 36\); rerun dvc repro "
                                        r"prepare"):
        ManifestDataset(tmp_path / "p", "train", DataConfig(fit="crop", resize=40, crop=32))


def test_slug():
    assert slug("A Red  circle!") == "a-red-circle"


def test_prepare_cli_one_line_error(tmp_path):
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    shutil.copy(repo / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("prepare:\n  source: webdataset\n")
    r = subprocess.run([sys.executable, str(repo / "stages" / "prepare.py")], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "prepare.source" in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5])
def test_val_fraction_outside_range_names_key(value):
    from cdsam.config.parse import parse_params
    from cdsam.errors import ConfigError

    with pytest.raises(ConfigError, match=r"prepare.val_fraction: must be in \(0, 1\)"):
        parse_params({"prepare": {"val_fraction": value}})


def test_missing_voc_root_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="prepare.root: folder not found"):
        prepare(PrepareConfig(source="voc", root=str(tmp_path / "none")), 0, tmp_path / "p",
                False)
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="prepare.images: no images"):
        prepare(PrepareConfig(source="folders", images=str(tmp_path / "imgs"),
                              masks=str(tmp_path / "imgs"), prompt="x"), 0, tmp_path / "p",
                False)


# --------------------------------------------------------------------------- negatives


def test_synthetic_negatives_name_absent_objects(tmp_path):
    cfg = PrepareConfig(negatives="absent", negatives_per_image=2,
                        synthetic=SyntheticConfig(num_images=12, image_size=32))
    summary = prepare(cfg, 0, tmp_path / "p", show_progress=False, data=whole(32))
    df = read_samples(tmp_path / "p")
    masks = prepared_arrays(tmp_path / "p")[0]
    assert summary["negative_samples"] == 24 == int(df["negative"].sum())
    assert summary["positive_samples"] + summary["negative_samples"] == len(df)
    for _, g in df.groupby("image"):
        present = set(g.loc[~g["negative"], "prompt"])
        absent = set(g.loc[g["negative"], "prompt"])
        assert len(absent) == 2 and not (absent & present)
    for sid in df.loc[df["negative"], "id"]:
        assert not (masks[sid] == FOREGROUND).any()
    # the positives are the ones prepare.negatives: none gives, and the draw is seeded
    prepare(PrepareConfig(synthetic=cfg.synthetic, negatives="none"), 0, tmp_path / "q",
            show_progress=False)
    plain = read_samples(tmp_path / "q")
    assert list(plain["id"]) == list(df.loc[~df["negative"], "id"])
    prepare(cfg, 0, tmp_path / "r", show_progress=False, data=whole(32))
    assert (tmp_path / "r" / "samples.csv").read_bytes() == \
        (tmp_path / "p" / "samples.csv").read_bytes()


def test_folders_empty_mask_is_a_negative(tmp_path):
    cfg = _folders(tmp_path)
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(tmp_path / "masks" / "im1.png")
    summary = prepare(cfg, 0, tmp_path / "p", show_progress=False)
    df = read_samples(tmp_path / "p").set_index("id")
    assert summary["negative_samples"] == 1 and bool(df.loc["im1__a-lesion", "negative"])


def _indexed(tmp_path, labels: list[np.ndarray]):
    img_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    for i, lab in enumerate(labels):
        Image.fromarray(np.full((*lab.shape, 3), 30 * i, np.uint8)).save(img_dir / f"im{i}.png")
        Image.fromarray(lab.astype(np.uint8)).save(mask_dir / f"im{i}.png")
    return PrepareConfig(source="folders", images=str(img_dir), masks=str(mask_dir),
                         mask_format="indexed", classes=["cell", "nucleus", "vesicle"],
                         prompt_template="a {}", val_fraction=0.34)


def test_folders_class_indexed_masks_with_negatives(tmp_path):
    lab = np.zeros((12, 12), np.uint8)
    lab[1:5, 1:5] = 1
    lab[6:9, 6:9] = 2
    lab[11, :] = 255
    cfg = _indexed(tmp_path, [lab, lab, np.where(lab == 2, 0, lab)])
    cfg.negatives = "absent"
    cfg.negatives_per_image = 0  # every absent class
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=whole(12))
    df = read_samples(tmp_path / "p").set_index("id")
    masks = prepared_arrays(tmp_path / "p")[0]
    assert set(df.index) == {f"im{i}__a-{c}" for i in range(3) for c in ("cell", "nucleus",
                                                                         "vesicle")}
    assert list(df.loc[["im2__a-nucleus", "im0__a-vesicle"], "negative"]) == [True, True]
    m = masks["im0__a-nucleus"]
    assert (m[6:9, 6:9] == FOREGROUND).all() and m[1:5, 1:5].max() == 0
    assert (m[11] == IGNORE).all()
    neg = masks["im0__a-vesicle"]
    assert (neg[11] == IGNORE).all() and neg[:11].max() == 0  # ignore stays ignore


def test_folders_label_beyond_class_list_names_file(tmp_path):
    lab = np.zeros((8, 8), np.uint8)
    lab[2:4, 2:4] = 4
    cfg = _indexed(tmp_path, [lab, lab])
    with pytest.raises(DataError, match=r"im0.png: label 4 is beyond prepare.classes"):
        prepare(cfg, 0, tmp_path / "p", show_progress=False)
    assert not (tmp_path / "p").exists()
    cfg.classes = None
    with pytest.raises(DataError, match="prepare.classes: required"):
        prepare(cfg, 0, tmp_path / "p", show_progress=False)


def test_folders_one_mask_folder_per_class(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for c in ("crack", "dent"):
        (tmp_path / "masks" / c).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((10, 10, 3), 50 * i, np.uint8)).save(img_dir / f"p{i}.png")
        m = np.zeros((10, 10), np.uint8)
        m[i:i + 3, 2:6] = 255
        Image.fromarray(m).save(tmp_path / "masks" / "crack" / f"p{i}.png")
    Image.fromarray(np.eye(10, dtype=np.uint8)).save(tmp_path / "masks" / "dent" / "p1.png")
    cfg = PrepareConfig(source="folders", images=str(img_dir), masks=str(tmp_path / "masks"),
                        mask_format="per_class", classes=["crack", "dent"],
                        prompt_template="a {}", negatives="absent", val_fraction=0.34)
    summary = prepare(cfg, 0, tmp_path / "p", show_progress=False)
    df = read_samples(tmp_path / "p").set_index("id")
    assert summary["samples"] == 6 and summary["negative_samples"] == 2  # p0, p2 lack a dent
    assert not df.loc["p1__a-dent", "negative"] and df.loc["p2__a-dent", "negative"]


def test_voc_negatives_keep_borders_ignore(tmp_path):
    root = _voc(tmp_path)
    cfg = PrepareConfig(source="voc", root=str(root), negatives="absent", negatives_per_image=3)
    summary = prepare(cfg, 0, tmp_path / "p", show_progress=False, data=whole(16))
    df = read_samples(tmp_path / "p")
    assert summary["negative_samples"] == 4 * 3 and summary["positive_samples"] == 8
    neg = df[df["negative"]]
    assert not set(neg["prompt"]) & {"a photo of a person", "a photo of a dog"}
    m = prepared_arrays(tmp_path / "p")[0][neg["id"].iloc[0]]
    assert (m[8] == IGNORE).all() and set(np.unique(m)) == {0, IGNORE}


def test_voc_image_without_a_class_is_not_a_bad_file(tmp_path):
    root = _voc(tmp_path)
    empty = np.zeros((16, 16), np.uint8)
    im = Image.fromarray(empty, mode="P")
    im.putpalette([0, 0, 0] * 256)
    im.save(root / "SegmentationClass" / "2007_000001.png")
    summary = prepare(PrepareConfig(source="voc", root=str(root), negatives="none"), 0,
                      tmp_path / "p", False)
    assert summary["images_without_samples"] == 1 and summary["images"] == 3
    summary = prepare(PrepareConfig(source="voc", root=str(root), negatives="absent"), 0,
                      tmp_path / "q", False)
    assert summary["images"] == 4


def test_negative_is_decided_on_the_fitted_mask(tmp_path, caplog):
    """A centre crop can cut an object out entirely: that sample is a negative for the model,
    and the prepare log and metrics say how many positives the fit emptied."""
    import logging

    cfg = PrepareConfig(val_fraction=0.25, test_fraction=0.0,
                        synthetic=SyntheticConfig(num_images=40, image_size=64))
    with caplog.at_level(logging.WARNING, logger="cdsam"):
        summary = prepare(cfg, 0, tmp_path / "p", show_progress=False,
                          data=DataConfig(fit="crop", resize=64, crop=32))
    df = read_samples(tmp_path / "p")
    masks = prepared_arrays(tmp_path / "p")[0]
    empty = df["id"].map(lambda i: not (masks[i] == FOREGROUND).any())
    assert (df["negative"] == empty).all()
    assert summary["emptied_by_fit"] > 0
    assert summary["negative_samples"] == int(empty.sum())
    assert f"{summary['emptied_by_fit']} positive samples became negatives" in caplog.text


def test_16_bit_images_are_scaled_by_their_own_range(tmp_path):
    """PIL's convert("RGB") clips a 16-bit image at 255: a microscopy frame went white."""
    from cdsam.data.manifest import open_image
    from cdsam.inference.predictor import to_pil

    values = (np.arange(24 * 20).reshape(20, 24) * 100 + 1000).astype(np.uint16)
    path = tmp_path / "frame.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    for rgb in (open_image(path, "RGB"), to_pil(path), to_pil(Image.open(path))):
        arr = np.asarray(rgb)
        assert arr.shape == (20, 24, 3) and arr.min() == 0 and arr.max() == 255
        expected = np.rint((values - 1000) * (255 / (values.max() - 1000.0)))
        assert np.array_equal(arr[..., 0], expected.astype(np.uint8))
    eight = tmp_path / "plain.png"
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(eight)
    assert np.asarray(open_image(eight, "RGB")).max() == 7  # 8-bit images are left as they are
