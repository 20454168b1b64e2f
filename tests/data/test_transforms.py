"""Training-time views: square resize, random crop, flip, each switchable; seeded and exact. The
evaluation view: each model's reference pipeline (timm's transform, the official BiT resize)."""
import struct
from dataclasses import replace

import numpy as np
import pytest

from bitlab.data.transforms import (
    BadImageError, TrainAugment, decode_image, decode_image_bytes, random_crop, resize, resize_shorter,
    square_eval_image, train_image,
)
from bitlab.errors import BitlabError
from tests.fixtures.images import jpeg_declaring, png_declaring
from tests.fixtures.reference_views import FAR, MAX_LEVELS, NEAR, differing, reference_view


def test_train_view_matches_manual_recipe(photos):
    img = photos["coffee"]  # 400x600: squashed to a square, as the official Resize((p, p))
    aug = TrainAugment(resize=80, crop=64)
    out = train_image(img, aug, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    square = resize(img, 80, 80)
    top, left = int(rng.integers(0, 17)), int(rng.integers(0, 17))
    expected = square[top:top + 64, left:left + 64]
    if rng.random() < 0.5:
        expected = expected[:, ::-1]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_seeded_views_repeat_and_vary(photos):
    aug = TrainAugment(resize=96, crop=64)
    a = [train_image(photos["chelsea"], aug, np.random.default_rng(s)) for s in range(8)]
    b = [train_image(photos["chelsea"], aug, np.random.default_rng(s)) for s in range(8)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({x.tobytes() for x in a}) > 1  # different seeds give different crops/flips


def test_flips_happen_about_half_the_time(photos):
    img = photos["rocket"]
    aug = TrainAugment(resize=64, crop=64, random_crop=False)  # only the flip is random
    plain = resize(img, 64, 64)
    flips = sum(not np.array_equal(train_image(img, aug, np.random.default_rng(s)), plain) for s in range(200))
    assert 70 < flips < 130


def test_each_step_can_be_disabled(photos):
    img = photos["coffee"]  # 400 x 600
    no_flip = TrainAugment(resize=64, crop=48, flip=False)
    for s in range(20):
        rng = np.random.default_rng(s)
        out = train_image(img, no_flip, rng)
        square = resize(img, 64, 64)
        # without flip the view is always an unmirrored window of the square
        assert any(np.array_equal(out, square[t:t + 48, l:l + 48]) for t in range(17) for l in range(17))
    centre = TrainAugment(resize=64, crop=48, random_crop=False, flip=False)
    views = {train_image(img, centre, np.random.default_rng(s)).tobytes() for s in range(5)}
    assert len(views) == 1
    keep_aspect = TrainAugment(resize=64, crop=48, square_resize=False, random_crop=False, flip=False)
    out = train_image(img, keep_aspect, np.random.default_rng(0))
    shorter = resize_shorter(img, 64)
    assert shorter.shape[:2] == (64, 96)
    np.testing.assert_array_equal(out, shorter[8:56, 24:72])


def test_eval_view_is_a_plain_resize(photos):
    out = square_eval_image(photos["coffee"], 48)
    np.testing.assert_array_equal(out, resize(photos["coffee"], 48, 48))


def test_random_crop_covers_every_position():
    img = np.arange(5 * 5 * 3, dtype=np.uint8).reshape(5, 5, 3)
    corners = {random_crop(img, 4, np.random.default_rng(s))[0, 0, 0] for s in range(100)}
    assert corners == {img[t, l, 0] for t in (0, 1) for l in (0, 1)}


def test_crop_larger_than_resize_is_refused():
    with pytest.raises(BitlabError, match="crop"):
        TrainAugment(resize=32, crop=48)


def test_normalize_is_the_exact_affine_map():
    import torch

    from bitlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize

    batch = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1, 1)
    for mean, std in (((0.5,) * 3, (0.5,) * 3), (IMAGENET_MEAN, IMAGENET_STD)):
        ref = (batch.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / \
            torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
        out = normalize(batch, mean, std)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-6)
    bit = normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).repeat(1, 3, 1, 1))
    assert bit.min() == -1 and bit.max() == 1  # BiT's [-1, 1]


@pytest.mark.parametrize("data", [png_declaring(40000, 40000), jpeg_declaring(40000, 40000),
                                  b"GIF89a" + struct.pack("<HH", 65535, 65535) + bytes(8)])
def test_huge_declared_sizes_are_refused_before_decoding(tmp_path, data):
    path = tmp_path / "huge.img"
    path.write_bytes(data)
    with pytest.raises(BadImageError, match=r"huge\.img: the file declares \d+ x \d+ px \(\d+ M px\), more than "
                                            r"the 268 M px bitlab decodes"):
        decode_image(path)
    with pytest.raises(BadImageError, match=r"shard\.tar:k\.png: the file declares"):
        decode_image_bytes(data, "shard.tar:k.png")


# ----------------------------------------------------------------------------- the reference evaluation view
@pytest.mark.parametrize("interpolation, other", [("bicubic", "bilinear"), ("bilinear", "bicubic")])
@pytest.mark.parametrize("size, crop_pct, crop_mode", [(224, 0.875, "center"), (97, 0.9, "center"),
                                                       (224, 1.0, "squash"), (61, 0.8, "squash")])
def test_eval_view_resamples_with_the_interpolation_the_model_asks_for(photos, interpolation, other, size,
                                                                       crop_pct, crop_mode):
    """A config that says bicubic gets the bicubic reference's pixels, not bilinear's (and back)."""
    from bitlab.data.transforms import DataConfig, eval_image

    cfg = DataConfig(input_size=size, interpolation=interpolation, crop_pct=crop_pct, crop_mode=crop_mode)
    near, far = [], []
    for img in photos.values():
        out, ref = eval_image(img, cfg), reference_view(img, cfg)
        assert out.shape == ref.shape == (size, size, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - ref).max() <= MAX_LEVELS
        near.append(differing(out, ref))
        far.append(differing(out, reference_view(img, replace(cfg, interpolation=other))))
    assert max(near) < NEAR and np.mean(far) > FAR, (near, far)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest", "box", "hamming", "lanczos"])
def test_filters_other_than_bicubic_are_pils_own(photos, interpolation):
    from bitlab.data.transforms import DataConfig, eval_image

    for cfg in (DataConfig(input_size=97, interpolation=interpolation, crop_pct=0.9, crop_mode="center"),
                DataConfig(input_size=64, interpolation=interpolation)):
        for img in photos.values():
            np.testing.assert_array_equal(eval_image(img, cfg), reference_view(img, cfg))


def test_eval_view_geometry_is_torchvisions(photos):
    """Resize target and centre-crop offsets as the reference computes them: the shorter side to
    floor(size / crop_pct), the longer side truncated, offsets rounded half to even (not floored);
    squash resizes both sides and, at crop_pct 1, crops nothing (BiT's official view)."""
    from bitlab.data.transforms import DataConfig, eval_resize_shape, reference_center_crop

    centre = DataConfig(input_size=224, crop_pct=0.875, crop_mode="center")
    assert eval_resize_shape(400, 600, centre) == (256, 384)
    assert eval_resize_shape(451, 300, centre) == (384, 256)  # 256 * 451 / 300 = 384.85, truncated
    assert eval_resize_shape(400, 600, DataConfig(input_size=260, crop_pct=0.89, crop_mode="center"))[0] == 292
    assert eval_resize_shape(400, 600, DataConfig(input_size=480)) == (480, 480)
    img = np.arange(7 * 10, dtype=np.uint8).reshape(7, 10, 1)
    # (7 - 4) / 2 = 1.5 -> 2 and (10 - 4) / 2 = 3: torchvision's CenterCrop; floor would start at row 1
    np.testing.assert_array_equal(reference_center_crop(img, 4), img[2:6, 3:7])


def test_bad_data_configs_are_refused():
    from bitlab.data.transforms import DataConfig

    with pytest.raises(BitlabError, match="interpolation 'cubic' is not supported"):
        DataConfig(interpolation="cubic")
    with pytest.raises(BitlabError, match="crop_mode 'border' is not supported"):
        DataConfig(crop_mode="border")
    with pytest.raises(BitlabError, match=r"crop_pct must be in \(0, 1\]"):
        DataConfig(crop_pct=0)
