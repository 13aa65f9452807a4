"""Tiled prediction of large images: windows, blending, and agreement with untiled runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cdsam.data.geometry import BACKGROUND_LOGIT, Geometry
from cdsam.errors import UserError
from cdsam.inference.predictor import load_model
from cdsam.inference.tiling import Blender, blend, predict_tiled, ramp, seen_pixels, windows
from tests.test_predict import PROMPTS, ckpt  # noqa: F401  (the module-scoped checkpoint)


@pytest.mark.parametrize("h,w,tile,overlap", [(100, 100, 100, 10), (250, 130, 100, 20),
                                              (1536, 2048, 512, 64), (101, 300, 100, 99)])
def test_windows_cover_the_image_flush_with_its_edges(h, w, tile, overlap):
    wins = windows(h, w, tile, overlap)
    covered = np.zeros((h, w), bool)
    for top, left, bottom, right in wins:
        assert bottom - top <= tile and right - left <= tile
        covered[top:bottom, left:right] = True
    assert covered.all()
    assert max(b for _, _, b, _ in wins) == h and max(r for _, _, _, r in wins) == w
    if h <= tile and w <= tile:
        assert wins == [(0, 0, h, w)]


def test_bad_tile_settings_are_one_line():
    with pytest.raises(UserError, match="--tile/--overlap"):
        windows(10, 10, 8, 8)


def test_blend_keeps_single_window_values_and_ramps_are_positive():
    assert (ramp(50, 10) > 0).all() and ramp(50, 10).max() == 1
    a, b = torch.full((1, 10, 8), 2.0), torch.full((1, 10, 8), -2.0)
    out = blend([((0, 0, 10, 8), a), ((0, 4, 10, 12), b)], 10, 12, overlap=4)
    torch.testing.assert_close(out[:, :, :4], a[:, :, :4])  # left window alone
    torch.testing.assert_close(out[:, :, 8:], b[:, :, 4:])  # right window alone
    assert (out[:, :, 4:8] > -2).all() and (out[:, :, 4:8] < 2).all()  # a mix in between
    only = torch.randn(2, 5, 5)
    assert blend([((0, 0, 5, 5), only)], 5, 5, 2) is only


def _photo(h, w):
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_an_image_that_fits_one_tile_is_predicted_exactly_as_untiled(ckpt):  # noqa: F811
    predictor = load_model(ckpt)
    img = _photo(40, 56)
    tiled = predict_tiled(predictor, img, PROMPTS, tile=64, overlap=16)
    plain = predictor.predict(img, PROMPTS, return_logits=True).logits
    np.testing.assert_array_equal(tiled.numpy(), plain)


def test_where_one_tile_covers_a_region_tiled_equals_that_tile_alone(ckpt):  # noqa: F811
    predictor = load_model(ckpt)
    img = _photo(48, 150)  # three 64-px windows across, overlapping by 21
    tiled = predict_tiled(predictor, img, PROMPTS, tile=64, overlap=21)
    assert tiled.shape == (2, 48, 150)
    left = predictor.predict(img.crop((0, 0, 64, 48)), PROMPTS, return_logits=True).logits
    # Columns 0..42 are covered by the first window alone (the second starts at 43).
    np.testing.assert_allclose(tiled[:, :, :43].numpy(), left[:, :, :43], rtol=1e-5,
                               atol=1e-5)


def test_cli_predict_tiles_large_images_only(ckpt, tmp_path):  # noqa: F811
    import json

    from cdsam import cli

    _photo(48, 150).save(tmp_path / "wide.png")
    _photo(40, 40).save(tmp_path / "small.png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "*.png"),
                  "--prompt", PROMPTS[0], "--out", str(out), "--tile", "64", "--overlap", "21",
                  "--save-probs", "npy", "--no-progress"])
    assert exc.value.code == 0
    assert json.loads((out / "summary.json").read_text())["tile"] == 64
    predictor = load_model(ckpt)
    wide = torch.sigmoid(predict_tiled(predictor, _photo(48, 150), PROMPTS[:1], 64, 21))
    np.testing.assert_allclose(np.load(out / "wide__probs.npy"), wide.numpy(), atol=2e-3)
    small = predictor.predict(_photo(40, 40), PROMPTS[:1], return_logits=True).probs
    np.testing.assert_allclose(np.load(out / "small__probs.npy"), small, atol=2e-3)


class ConstantModel:
    """A predictor whose model answers +5 everywhere in its input: window logits come back
    through the same geometry `Predictor.image_logits` uses (crop fit: the background fill
    outside the centre crop)."""

    resize, crop, fit = 256, 224, "crop"

    def iter_image_logits(self, images, prompts, batch_size=8):
        for im in images:
            geo = Geometry.of(im.height, im.width, self.resize, self.crop, self.fit)
            yield geo.to_original(torch.full((len(prompts), self.crop, self.crop), 5.0))

    def image_logits(self, images, prompts, batch_size=8):
        return list(self.iter_image_logits(images, prompts, batch_size))


def test_pixels_a_window_does_not_see_weigh_nothing_in_the_blend():
    """Crop fit with resize > crop: each window's border lies outside its centre crop. A
    constant model must give a constant image where any window saw the pixel."""
    image = Image.new("RGB", (1200, 600))
    logits = predict_tiled(ConstantModel(), image, ["a thing"], tile=448, overlap=64)
    assert logits.shape == (1, 600, 1200)
    seen = torch.zeros(600, 1200, dtype=torch.bool)
    for top, left, bottom, right in windows(600, 1200, 448, 64):
        seen[top:bottom, left:right] |= seen_pixels(bottom - top, right - left, 256, 224,
                                                    "crop")
    assert seen.float().mean() > 0.8
    torch.testing.assert_close(logits[0][seen], torch.full((int(seen.sum()),), 5.0))
    assert (logits[0][~seen] == BACKGROUND_LOGIT).all()  # as untiled prediction leaves them


def test_windows_blended_as_they_arrive_equal_the_blend_of_all_of_them():
    """`Blender` (what predict_tiled streams into) gives `blend`'s result in any window order,
    holding one PxHxW sum instead of every window's logits."""
    g = torch.Generator().manual_seed(0)
    wins = windows(100, 170, 48, 12)
    parts = [(w, torch.randn(3, w[2] - w[0], w[3] - w[1], generator=g)) for w in wins]
    seen = [torch.rand(w[2] - w[0], w[3] - w[1], generator=g) > 0.2 for w in wins]
    # the reference, written out: weighted mean of every window covering a pixel
    num, den = torch.zeros(3, 100, 170, dtype=torch.float64), torch.zeros(100, 170,
                                                                          dtype=torch.float64)
    for (top, left, bottom, right), logits in parts:
        k = wins.index((top, left, bottom, right))
        w = (ramp(bottom - top, 12)[:, None] * ramp(right - left, 12)[None, :]) * seen[k]
        num[:, top:bottom, left:right] += logits * w
        den[top:bottom, left:right] += w
    whole = torch.where(den > 0, num / den.clamp(min=1e-30), BACKGROUND_LOGIT).float()
    assert (den == 0).any() and (den > 0).float().mean() > 0.9
    torch.testing.assert_close(blend(parts, 100, 170, 12, seen), whole)
    blender = Blender(3, 100, 170, 12)
    for k in reversed(range(len(parts))):
        blender.add(parts[k][0], parts[k][1], seen[k])
    torch.testing.assert_close(blender.result(), whole)
