"""Fit (crop / pad), seeded augmentation, and the way logits go back onto the image."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from cdsam.config.schema import AugmentConfig, DataConfig, PrepareConfig
from cdsam.data.augment import augment_pair, build_augment, sample_seed
from cdsam.data.dataset import ManifestDataset
from cdsam.data.geometry import BACKGROUND_LOGIT, PAD_RGB, Geometry, fit_transform
from cdsam.data.manifest import FOREGROUND, IGNORE
from cdsam.data.prepare import prepare


def _pair(h, w):
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    mask = torch.zeros(1, h, w, dtype=torch.uint8)
    img[:, :, : w // 6] = 255  # a white stripe in the left sixth of a wide image ...
    mask[:, :, : w // 6] = FOREGROUND  # ... which is the object
    return tv_tensors.Image(img), tv_tensors.Mask(mask)


def test_pad_fit_sees_the_whole_image_and_ignores_the_padding():
    img, mask = _pair(30, 60)
    x, m = fit_transform("pad", 0, 32)(img, mask)
    assert x.shape == (3, 32, 32) and m.shape == (1, 32, 32)
    assert (m[0, :15, :5] == FOREGROUND).all()  # the object at the far left is in view
    assert (m[0, 16:] == IGNORE).all() and (m[0, :16] != IGNORE).all()  # 30x60 -> 16x32
    assert x[:, 20, 10].tolist() == list(PAD_RGB)
    xc, mc = fit_transform("crop", 32, 32)(img, mask)
    assert not (mc == FOREGROUND).any()  # the centre crop never sees it


@pytest.mark.parametrize("fit", ["crop", "pad"])
@pytest.mark.parametrize("h,w", [(30, 60), (61, 20), (32, 32)])
def test_geometry_maps_the_input_frame_back(fit, h, w):
    geo = Geometry.of(h, w, 32, 32, fit)
    img, mask = _pair(h, w)
    _, m = fit_transform(fit, 32, 32)(img, mask)
    logits = torch.where(m == FOREGROUND, 10.0, -10.0).float()  # a perfect model's logits
    back = geo.to_original(logits)
    assert back.shape == (1, h, w)
    truth = mask[0].bool()
    if fit == "pad":
        agree = ((back[0] > 0) == truth).float().mean().item()
        assert agree > 0.9  # up to resampling at the edges of a 3-px stripe
        assert (back[0] > BACKGROUND_LOGIT / 2).all()  # every pixel was seen
    else:
        unseen = back[0] <= BACKGROUND_LOGIT / 2
        assert unseen.any() == (h != w)


def test_pad_point_coordinates():
    geo = Geometry.of(100, 200, 0, 64, "pad")
    assert geo.resized == (32, 64)
    assert geo.to_crop(200, 100) == (64.0, 32.0)


def test_augment_is_seeded_per_epoch_and_sample_and_moves_mask_with_image():
    cfg = AugmentConfig(enable=True, hflip=0.5, scale=0.3, rotate=20, colour=0.0)
    t = build_augment(cfg, 32)
    rng = np.random.default_rng(0)
    base = np.kron(rng.random((4, 4)) > 0.5, np.ones((8, 8), bool))  # 8-px blocks
    img = tv_tensors.Image(torch.from_numpy(np.stack([base * 255] * 3).astype(np.uint8)))
    mask = tv_tensors.Mask(torch.from_numpy(base[None].astype(np.uint8)))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = augment_pair(t, img, mask, sample_seed(0, 1, 5))
    b = augment_pair(t, img, mask, sample_seed(0, 1, 5))
    c = augment_pair(t, img, mask, sample_seed(0, 2, 5))
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    for x, m in (a, c):
        m = m[0]
        seen = m != IGNORE
        # where the mask says object the image is bright, elsewhere dark (both moved together)
        bright = x[0] > 127
        agree = (bright[seen] == (m[seen] == FOREGROUND)).float().mean().item()
        assert agree > 0.9
    assert build_augment(AugmentConfig(enable=False), 32) is None


def test_dataset_augments_train_only_and_same_with_any_order(tmp_path):
    data = DataConfig(fit="pad", crop=48, augment=AugmentConfig(enable=True))
    prepare(PrepareConfig(), 0, tmp_path / "p", show_progress=False, data=data)
    train = ManifestDataset(tmp_path / "p", "train", data, augment=True, seed=3)
    plain = ManifestDataset(tmp_path / "p", "train", data)
    assert not torch.equal(train[(0, 0)]["image"], plain[0]["image"])
    first = train[(1, 4)]
    train[(0, 4)]
    again = ManifestDataset(tmp_path / "p", "train", data, augment=True, seed=3)[(1, 4)]
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["mask"],
                                                                      again["mask"])
    # one stored uint8 image per image, however many prompts it has
    assert len(plain.data.image_keys) == plain.df["image"].nunique() < len(plain)
    assert all(x.dtype == torch.uint8 for x in plain.fitted(0))


def test_wide_image_pad_prediction_reaches_the_outer_thirds(tmp_path):
    """A 2:1 scene, object in the right third: the pad fit maps a model's input-frame
    prediction onto it; the crop fit cannot (that third is outside its crop)."""
    w, h = 96, 48
    img = np.full((h, w, 3), 90, np.uint8)
    img[16:32, 76:92] = (215, 45, 40)
    truth = np.zeros((h, w), bool)
    truth[16:32, 76:92] = True
    for fit, expect in (("pad", True), ("crop", False)):
        geo = Geometry.of(h, w, 48, 48, fit)
        _, m = fit_transform(fit, 48, 48)(
            tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1)),
            tv_tensors.Mask(torch.from_numpy(truth[None].astype(np.uint8))))
        logits = torch.where(m == FOREGROUND, 10.0, -10.0).float()
        pred = (geo.to_original(logits)[0] > 0).numpy()
        assert pred[:, 2 * w // 3:].any() == expect
        if expect:
            iou = (pred & truth).sum() / (pred | truth).sum()
            assert iou > 0.8
    Image.fromarray(img).save(tmp_path / "wide.png")  # keeps the fixture inspectable
