"""The COCO source: RLE and polygons via pycocotools, crowd regions, splits, bad input."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from cdsam.config.schema import DataConfig, PrepareConfig
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.prepare import prepare
from cdsam.data.prepared import read_samples
from cdsam.data.sources.voc import VOC_CLASSES
from cdsam.errors import DataError
from tests.conftest import prepared_arrays, real_data

WHOLE = DataConfig(fit="pad", crop=30)  # the tiny 30x20 images at their own pixels


def _rle(binary: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def voc_as_coco(voc_root, out_json) -> None:
    """A COCO instances file saying exactly what the VOC label PNGs say: one RLE annotation
    per (image, class), and the 255 border as a crowd region of every class present."""
    images, anns = [], []
    for i, label_path in enumerate(sorted((voc_root / "SegmentationClass").glob("*.png"))):
        labels = np.asarray(Image.open(label_path))
        h, w = labels.shape
        images.append({"id": i + 1, "file_name": f"{label_path.stem}.jpg", "width": w,
                       "height": h})
        for c in (int(v) for v in np.unique(labels) if v not in (0, 255)):
            for region, crowd in ((labels == c, 0), (labels == 255, 1)):
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c,
                             "iscrowd": crowd, "segmentation": _rle(region),
                             "area": int(region.sum()), "bbox": [0, 0, w, h]})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(VOC_CLASSES)]
    out_json.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco_from_voc_prepares_the_same_masks(tmp_path):
    voc = real_data("voc-samples")
    voc_as_coco(voc, tmp_path / "instances.json")
    common = dict(val_fraction=0.3, test_fraction=0.0, negatives="none",
                  prompt_template="a photo of a {}")
    prepare(PrepareConfig(source="voc", root=str(voc), **common), 0, tmp_path / "v", False)
    prepare(PrepareConfig(source="coco", annotations=str(tmp_path / "instances.json"),
                          images=str(voc / "JPEGImages"), **common), 0, tmp_path / "c", False)
    a, b = read_samples(tmp_path / "v"), read_samples(tmp_path / "c")
    assert len(a) == len(b) > 14
    assert list(a["id"]) == list(b["id"]) and list(a["split"]) == list(b["split"])
    (ma, ia), (mb, ib) = prepared_arrays(tmp_path / "v"), prepared_arrays(tmp_path / "c")
    assert any((m == IGNORE).any() for m in ma.values())  # the 255 borders are kept
    for sid in a["id"]:
        np.testing.assert_array_equal(ma[sid], mb[sid])  # foreground, background, borders
    for stem in ia:
        np.testing.assert_array_equal(ia[stem], ib[stem])


def _tiny_coco(tmp_path, n=4, **image_over):
    (tmp_path / "imgs").mkdir(exist_ok=True)
    images, anns = [], []
    for i in range(n):
        Image.fromarray(np.full((20, 30, 3), 20 * i, np.uint8)).save(tmp_path / "imgs" /
                                                                      f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": 30, "height": 20})
        # a square "box" (polygon) in every image; a "tin" crowd region in the first
        anns.append({"id": 10 + i, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                     "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "area": 100,
                     "bbox": [2, 2, 10, 10]})
    crowd = np.zeros((20, 30), bool)
    crowd[0:5, 20:30] = True
    anns.append({"id": 99, "image_id": 1, "category_id": 2, "iscrowd": 1,
                 "segmentation": _rle(crowd), "area": 50, "bbox": [20, 0, 10, 5]})
    tin = np.zeros((20, 30), bool)
    tin[10:18, 18:28] = True
    anns.append({"id": 98, "image_id": 2, "category_id": 2, "iscrowd": 0,
                 "segmentation": _rle(tin), "area": int(tin.sum()), "bbox": [18, 10, 10, 8]})
    images[0].update(image_over)
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "tin"},
                           {"id": 3, "name": "jar"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return PrepareConfig(source="coco", annotations=str(path), images=str(tmp_path / "imgs"),
                         prompt_template="a {}", val_fraction=0.25), data


def test_coco_polygons_crowd_and_negatives(tmp_path):
    cfg, _ = _tiny_coco(tmp_path)
    cfg.negatives = "absent"
    cfg.negatives_per_image = 0
    summary = prepare(cfg, 0, tmp_path / "p", show_progress=False, data=WHOLE)
    df = read_samples(tmp_path / "p").set_index("id")
    masks, _ = prepared_arrays(tmp_path / "p")
    box = masks["000__a-box"]
    assert (box[3:12, 3:12] == FOREGROUND).all() and box[14:, :].max() == 0
    # image 000 has only a crowd of tins: neither a tin positive nor an absent-tin negative
    assert "000__a-tin" not in df.index and bool(df.loc["000__a-jar", "negative"])
    tin = masks["001__a-tin"]
    assert tin.sum() > 0 and not df.loc["001__a-tin", "negative"]
    # positives: 4 boxes + 1 tin; negatives: jar x4, tin in images 002 and 003
    assert summary["positive_samples"] == 5 and summary["negative_samples"] == 6


def test_coco_crowd_region_is_ignore_for_its_category(tmp_path):
    cfg, data = _tiny_coco(tmp_path)
    extra = np.zeros((20, 30), bool)
    extra[15:20, 0:10] = True
    data["annotations"].append({"id": 97, "image_id": 2, "category_id": 2, "iscrowd": 1,
                                "segmentation": _rle(extra), "area": 50, "bbox": [0, 15, 10, 5]})
    (tmp_path / "ann.json").write_text(json.dumps(data))
    prepare(cfg, 0, tmp_path / "p", show_progress=False, data=WHOLE)
    masks, _ = prepared_arrays(tmp_path / "p")
    tin = masks["001__a-tin"]
    assert tin.shape == (20, 30)
    assert (tin[15:20, 0:10] == IGNORE).all() and (tin[10:18, 18:28] == FOREGROUND).all()
    box = masks["001__a-box"]
    assert IGNORE not in box  # another category's crowd is not ignore for boxes


def test_coco_classes_subset_and_split_files(tmp_path):
    cfg, data = _tiny_coco(tmp_path)
    def part(keep):  # the instances file restricted to some image ids
        return dict(data, images=[i for i in data["images"] if i["id"] in keep],
                    annotations=[a for a in data["annotations"] if a["image_id"] in keep])

    (tmp_path / "val.json").write_text(json.dumps(part({1})))
    (tmp_path / "ann.json").write_text(json.dumps(part({2, 3, 4})))
    cfg.val_annotations = str(tmp_path / "val.json")
    cfg.classes = ["box"]
    cfg.test_fraction = 0.0
    prepare(cfg, 0, tmp_path / "p", show_progress=False)
    df = read_samples(tmp_path / "p")
    assert set(df["prompt"]) == {"a box"}
    assert set(df.loc[df["split"] == "val", "image"]) == {"000"}
    assert (df["split"] == "train").sum() == 3  # with a val file, the main file all trains


@pytest.mark.parametrize("case,match", [
    ("missing", r"imgs/003.png: image listed in .*ann.json \(id 4\) not found"),
    ("polygon", r"ann.json: image 002.png: annotation 12: polygon point outside the image 30x20"),
    ("classes", r"prepare.classes: unknown category 'bottle' in .*ann.json \(known: box, jar, "
                r"tin\)"),
    ("size", r"imgs/000.png: image is 30x20, .*ann.json says 31x20"),
])
def test_coco_bad_input_is_one_line_naming_the_file(tmp_path, case, match):
    cfg, data = _tiny_coco(tmp_path, n=6, **({"width": 31} if case == "size" else {}))
    if case == "missing":
        (tmp_path / "imgs" / "003.png").unlink()
    elif case == "polygon":
        data["annotations"][2]["segmentation"] = [[2, 2, 45, 2, 45, 12, 2, 12]]
        (tmp_path / "ann.json").write_text(json.dumps(data))
    elif case == "classes":
        cfg.classes = ["box", "bottle"]
    with pytest.raises(DataError, match=match) as exc:
        prepare(cfg, 0, tmp_path / "p", show_progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "p").exists()
    if case in ("missing", "polygon"):  # with skip, the rest is prepared
        cfg.on_bad_file = "skip"
        assert prepare(cfg, 0, tmp_path / "p", show_progress=False)["skipped_files"] == 1


def test_coco_not_an_instances_file(tmp_path):
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"x.json: not a COCO instances file"):
        prepare(PrepareConfig(source="coco", annotations=str(tmp_path / "x.json"),
                              images=str(tmp_path)), 0, tmp_path / "p", False)
    with pytest.raises(DataError, match="prepare.annotations: required"):
        prepare(PrepareConfig(source="coco"), 0, tmp_path / "p", False)
