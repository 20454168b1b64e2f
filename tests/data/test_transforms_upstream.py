"""The upstream (pre-training) part of bitlab.data.transforms: Inception crop, flip, evaluation view."""
import numpy as np
import pytest

from bitlab.data.transforms import (
    BadImageError, InceptionAugment, decode_image_bytes, inception_box, inception_image, resize, upstream_eval_image,
)
from bitlab.errors import BitlabError


def test_boxes_follow_the_area_and_aspect_ranges():
    aug = InceptionAugment(crop=224)
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = inception_box(400, 600, aug, rng)
        assert 0 <= top and top + h <= 400 and 0 <= left and left + w <= 600
        areas.append(h * w / (400 * 600))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.045 and areas.max() <= 1.0
    assert np.mean(areas < 0.08) > 0.01  # the 5 % floor, not torchvision's 8 %
    assert ratios.min() >= 0.74 and ratios.max() <= 1.34  # TF's default 0.75-1.33, not 3/4-4/3
    assert areas.max() > 0.8  # large boxes too (those that do not fit are redrawn, as in TF)


def test_box_sides_are_uniform_as_tf_draws_them():
    """TF draws the height uniformly over the whole pixels that keep the area in range, so with
    a fixed aspect of 1 on a 400 x 400 image sides are uniform over 90..400 (mean 244.5); drawing
    the area uniformly instead (torchvision) would give a mean side of 278."""
    aug = InceptionAugment(crop=64, ratio=(1.0, 1.0))
    rng = np.random.default_rng(0)
    boxes = np.array([inception_box(400, 400, aug, rng) for _ in range(4000)])
    top, left, h, w = boxes.T
    assert (h == w).all() and h.min() == 90 and h.max() == 400  # 89 x 89 < 5 %: one pixel more, as TF
    assert abs(h.mean() - 244.5) < 4
    # offsets as TF's: uniform in [0, 400 - h), 0 for a full-size box
    assert (top + h < 400)[h < 400].all() and (left + w < 400)[w < 400].all()
    assert (top[h == 400] == 0).all()
    with pytest.raises(BitlabError, match="aspect range"):
        InceptionAugment(ratio=(1.5, 1.0))


def test_whole_image_when_no_box_fits():
    # A 1 x 400 strip admits no box of aspect 3/4-4/3 with >= 5 % of its area.
    assert inception_box(1, 400, InceptionAugment(), np.random.default_rng(0)) == (0, 0, 1, 400)


def test_view_is_the_resized_box_flipped_half_the_time(photos):
    img = photos["astronaut"]
    aug = InceptionAugment(crop=64)
    flips = 0
    for seed in range(200):
        view = inception_image(img, aug, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        top, left, h, w = inception_box(*img.shape[:2], aug, rng)
        expected = resize(img[top:top + h, left:left + w], 64, 64)
        flipped = rng.random() < 0.5
        flips += flipped
        assert view.shape == (64, 64, 3) and view.dtype == np.uint8
        np.testing.assert_array_equal(view, expected[:, ::-1] if flipped else expected)
    assert 70 < flips < 130
    no_flip = InceptionAugment(crop=64, flip=False)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        top, left, h, w = inception_box(*img.shape[:2], no_flip, rng)
        np.testing.assert_array_equal(inception_image(img, no_flip, np.random.default_rng(seed)),
                                      resize(img[top:top + h, left:left + w], 64, 64))


def test_eval_view_is_resize_256_centre_224(photos):
    img = photos["coffee"]  # 400 x 600
    view = upstream_eval_image(img, 224)
    full = resize(img, 384, 256)
    np.testing.assert_array_equal(view, full[16:240, 80:304])


def test_bad_settings_and_bytes():
    with pytest.raises(BitlabError, match="area range"):
        InceptionAugment(area=(0.0, 1.0))
    with pytest.raises(BitlabError, match="crop must be positive"):
        InceptionAugment(crop=0)
    with pytest.raises(BadImageError, match="shard.tar:k.jpg: cannot decode"):
        decode_image_bytes(b"not an image", "shard.tar:k.jpg")
