"""Objects leaving cdsam as files other tools open (`cdsam predict --instances`).

Every file of one run lists the same objects: those returned at the predictor's deployment
point (presence gate, ``min_quality``), each with its score.

- ``<stem>__instances.png`` per image: 16-bit object ids (0 background), painted lowest score
  first so where two objects overlap the better one shows; ``instances.csv`` names each id
  (image, prompt, label, score, box, area).
- ``coco_results.json``: COCO detection results (``image_id``, ``category_id``, compressed RLE
  ``segmentation``, ``bbox`` x y w h, ``score``), for pycocotools' ``COCO.loadRes`` against
  ``coco.json`` (or a ground truth with the same image ids and categories).
- ``--format coco``: ``coco.json``, a COCO instances file (images with ``file_name`` below
  the inputs' common folder, categories = the labels, RLE segmentations, ``iscrowd 0``): what
  ``prepare.source: coco`` and COCO-reading annotation tools load.
- ``--format labelme``: ``labelme/<stem>.json`` per image, one ``polygon`` shape per outer
  boundary of an object (OpenCV ``findContours``; one ``group_id`` an object, so a
  several-piece object stays one), ``imagePath`` relative to the JSON, shapes worst score
  first. labelme draws a polygon with PIL including its outline, which refills the traced
  pixels exactly; an object the polygons would not redraw exactly (a hole, pieces touching
  at a corner) is one ``mask`` shape instead (labelme's PNG over the box). labelme gives a
  pixel to the last shape covering it: where objects overlap the better one keeps it, as in
  the id PNG. A boundary of fewer than three points (a one-pixel-wide straight piece) is a
  ``rectangle``.
- ``--format cvat``: ``cvat.xml``, CVAT for images 1.1, one ``<mask>`` per object (CVAT's
  run-length encoding over the object's box, 0s first, as CVAT exports brush masks): exact,
  and editable with CVAT's brush.

Labels are the prompts, or for ``--class NAME`` prompts the class name, so ``prepare`` reads
the files back as the same classes (with ``prepare.prompt_template: "{}"`` where the labels
are whole prompts).
"""

from __future__ import annotations

import base64
import io as _io
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from pycocotools import mask as mask_utils

from cdsam import io
from cdsam.data.sources.draw import pil_box, pil_polygon
from cdsam.errors import UserError
from cdsam.inference.predictor import PromptObjects

FORMATS = ("coco", "labelme", "cvat")


def outer_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """HxW bool → each piece's outer boundary as an Nx2 float (x, y) array of pixel centres
    (OpenCV ``findContours``, external boundaries, straight runs as their end points)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1, 2).astype(np.float64) for c in contours]


def labelme_shapes(mask: np.ndarray, label: str, group: int, score: float
                   ) -> list[dict[str, Any]]:
    """One object → labelme shapes sharing ``group`` as their group_id: a ``polygon`` per
    piece (a ``rectangle`` where a piece's boundary has fewer than three points) when labelme
    redraws them into exactly ``mask``; else (holes, pieces touching at a corner) one ``mask``
    shape, a PNG over the object's box."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    box = (int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0)
    part = mask[y0:y0 + box[1], x0:x0 + box[0]]
    common = {"label": label, "group_id": group, "description": f"score {score:.4f}",
              "flags": {}, "mask": None}
    shapes, redrawn = [], np.zeros_like(part)
    for pts in outer_polygons(part):
        if len(pts) >= 3:
            redrawn |= pil_polygon(pts.tolist(), box)
            shapes.append({**common, "shape_type": "polygon", "points": (pts + (x0, y0)).tolist()})
        else:
            (a, b), (c, d) = pts.min(axis=0), pts.max(axis=0)
            redrawn |= pil_box(a, b, c, d, box)
            shapes.append({**common, "shape_type": "rectangle",
                           "points": [[a + x0, b + y0], [c + x0, d + y0]]})
    if (redrawn == part).all():
        return shapes
    png = _io.BytesIO()
    Image.fromarray(part.astype(np.uint8) * 255, "L").save(png, format="PNG")
    return [{**common, "shape_type": "mask",
             "points": [[x0, y0], [x0 + box[0] - 1, y0 + box[1] - 1]],
             "mask": base64.b64encode(png.getvalue()).decode("ascii")}]


def cvat_rle(mask: np.ndarray) -> tuple[str, int, int, int, int]:
    """HxW bool (non-empty) → (CVAT run lengths over the mask's box, row by row, starting with
    a run of 0s; left, top, width, height)."""
    ys, xs = np.nonzero(mask)
    top, left = int(ys.min()), int(xs.min())
    height, width = int(ys.max()) + 1 - top, int(xs.max()) + 1 - left
    flat = mask[top:top + height, left:left + width].ravel()
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    if flat[0]:
        runs = np.concatenate([[0], runs])  # the first run counts 0s
    return ",".join(str(int(r)) for r in runs), left, top, width, height


def paint_order(scores: list[float]) -> np.ndarray:
    """Worst score first: where objects overlap, the better one is painted last and keeps the
    pixels (labelme, too, gives a pixel to the last shape covering it)."""
    return np.argsort(np.asarray(scores, np.float64), kind="stable")


def id_map(objects: list[PromptObjects], size: tuple[int, int]) -> np.ndarray:
    """HxW uint16 object ids (``size``: width, height): the objects of all prompts numbered
    from 1 in order, 0 background, painted by :func:`paint_order`."""
    flat = [(m, float(s)) for o in objects for m, s in zip(o.masks, o.scores, strict=True)]
    if len(flat) > np.iinfo(np.uint16).max:
        raise UserError(f"{len(flat)} objects in one image: more than a 16-bit id PNG holds")
    ids = np.zeros((size[1], size[0]), np.uint16)
    for k in paint_order([s for _, s in flat]):
        ids[flat[k][0]] = k + 1
    return ids


def _rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class _Image:
    id: int
    path: Path
    stem: str
    size: tuple[int, int]  # (width, height)
    # (label, mask, its COCO RLE, score, COCO bbox x y w h)
    objects: list[tuple[str, np.ndarray, dict[str, Any], float, list[float]]] = \
        field(default_factory=list)


class InstanceWriter:
    """Collects each image's objects (:meth:`add`), writing its per-image files at once and
    the run's files at :meth:`close`."""

    def __init__(self, out: Path, prompts: list[str], formats: list[str],
                 labels: dict[str, str] | None = None) -> None:
        bad = [f for f in formats if f not in FORMATS]
        if bad:
            raise UserError(f"--format: {bad[0]!r} is not one of {', '.join(FORMATS)}")
        self.out, self.formats = out, list(dict.fromkeys(formats))
        self.labels = [(labels or {}).get(p, p) for p in prompts]
        self.category = {p: k for k, p in enumerate(prompts, start=1)}
        self.images: list[_Image] = []
        self.rows: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []

    def add(self, path: Path, stem: str, size: tuple[int, int],
            objects: list[PromptObjects]) -> int:
        """One image's objects (per prompt) → its id PNG (and labelme JSON); the number of
        objects."""
        image = _Image(len(self.images) + 1, path, stem, size)
        flat = [(o.prompt, m, float(s)) for o in objects for m, s in zip(o.masks, o.scores,
                                                                        strict=True)]
        order = paint_order([s for _, _, s in flat])
        with io.atomic_path(self.out / f"{stem}__instances.png") as tmp:
            Image.fromarray(id_map(objects, size)).save(tmp, format="PNG")
        shapes: list[dict[str, Any]] = []
        for k, (prompt, mask, score) in enumerate(flat, start=1):
            label = self.labels[self.category[prompt] - 1]
            rle = _rle(mask)
            x0, y0, w, h = mask_utils.toBbox(
                {**rle, "counts": rle["counts"].encode("ascii")}).tolist()
            self.rows.append({"image": str(path), "id": k, "prompt": prompt, "label": label,
                              "score": score, "x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h,
                              "area_px": int(mask.sum())})
            self.results.append({"image_id": image.id, "category_id": self.category[prompt],
                                 "segmentation": rle, "bbox": [x0, y0, w, h],
                                 "score": score})
            if "coco" in self.formats or "cvat" in self.formats:
                image.objects.append((label, mask, rle, score, [x0, y0, w, h]))
        if "labelme" in self.formats:
            for k in order:
                prompt, mask, score = flat[k]
                shapes += labelme_shapes(mask, self.labels[self.category[prompt] - 1], int(k) + 1,
                                         score)
            where = self.out / "labelme" / f"{stem}.json"
            where.parent.mkdir(parents=True, exist_ok=True)
            io.write_json(where, {
                "version": "5.5.0", "flags": {}, "shapes": shapes,
                "imagePath": Path(os.path.relpath(path.resolve(), where.parent.resolve()))
                .as_posix(),
                "imageData": None, "imageHeight": size[1], "imageWidth": size[0]})
        self.images.append(image)
        return len(flat)

    def root(self) -> Path:
        """The inputs' common folder: COCO ``file_name`` and CVAT ``name`` are below it."""
        if not self.images:
            return Path(".")
        return Path(os.path.commonpath([str(i.path.resolve().parent) for i in self.images]))

    def close(self) -> dict[str, Any]:
        """Write ``instances.csv``, ``coco_results.json`` and the run-wide formats; returns
        what summary.json records of them."""
        columns = ["image", "id", "prompt", "label", "score", "x0", "y0", "x1", "y1",
                   "area_px"]
        with io.atomic_path(self.out / "instances.csv") as tmp:
            pd.DataFrame(self.rows, columns=columns).to_csv(tmp, index=False)
        io.write_json(self.out / "coco_results.json", self.results)
        root = self.root()
        names = {i.id: i.path.resolve().relative_to(root).as_posix() for i in self.images}
        if "coco" in self.formats:
            io.write_json(self.out / "coco.json", self._coco(names))
        if "cvat" in self.formats:
            with io.atomic_path(self.out / "cvat.xml") as tmp:
                ET.ElementTree(self._cvat(names)).write(tmp, encoding="utf-8",
                                                        xml_declaration=True)
        return {"objects": len(self.rows), "formats": self.formats, "images_root": str(root)}

    def _coco(self, names: dict[int, str]) -> dict[str, Any]:
        anns = []
        for image in self.images:
            for label, mask, rle, score, bbox in image.objects:
                anns.append({"id": len(anns) + 1, "image_id": image.id,
                             "category_id": self.labels.index(label) + 1,
                             "segmentation": rle, "area": int(mask.sum()), "bbox": bbox,
                             "iscrowd": 0, "score": score})
        return {"images": [{"id": i.id, "file_name": names[i.id], "width": i.size[0],
                            "height": i.size[1]} for i in self.images],
                "categories": [{"id": k, "name": n} for k, n in enumerate(self.labels, 1)],
                "annotations": anns}

    def _cvat(self, names: dict[int, str]) -> ET.Element:
        root = ET.Element("annotations")
        ET.SubElement(root, "version").text = "1.1"
        task = ET.SubElement(ET.SubElement(root, "meta"), "task")
        labels = ET.SubElement(task, "labels")
        for name in dict.fromkeys(self.labels):
            label = ET.SubElement(labels, "label")
            ET.SubElement(label, "name").text = name
            ET.SubElement(label, "type").text = "mask"
        for image in self.images:
            el = ET.SubElement(root, "image", id=str(image.id - 1), name=names[image.id],
                               width=str(image.size[0]), height=str(image.size[1]))
            for label, mask, _, _, _ in image.objects:
                rle, left, top, width, height = cvat_rle(mask)
                ET.SubElement(el, "mask", label=label, source="auto", occluded="0", rle=rle,
                              left=str(left), top=str(top), width=str(width),
                              height=str(height), z_order="0")
        ET.indent(root)
        return root

