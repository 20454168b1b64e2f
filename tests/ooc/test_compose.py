"""Geometry and blending on real photos and real masks."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from bitlab.ooc import compose
from bitlab.paths import SAMPLE_DIR

OI = SAMPLE_DIR / "openimages"
SAMPLE = {  # image id -> mask file of the embedded sample
    row.split(",")[1]: row.split(",")[0]
    for row in (OI / "validation-annotations-object-segmentation.csv").read_text().splitlines()[1:]}
ZEBRA, SEA_LION, TANK, LIGHTHOUSE = "212826d645e3b0e6", "e0edcd42d4fb37ff", "cb2b1df6fbe718f3", "05dc505c2e373ad8"


def _fg(image_id: str):
    return compose.load_foreground(OI / "validation" / f"{image_id}.jpg", OI / "validation-masks" / SAMPLE[image_id])


def _hubble() -> np.ndarray:
    return compose.decode(SAMPLE_DIR / "backgrounds" / "outer_space" / "hubble_deep_field.jpg")


def _changed_box(out: np.ndarray, bg: np.ndarray):
    changed = np.any(out != bg, axis=2)
    return compose.tight_box(changed), changed


@pytest.mark.parametrize("image_id", list(SAMPLE))
@pytest.mark.parametrize("size,scale", [(512, 0.8), (224, 0.8), (97, 0.8), (300, 0.5)])
def test_object_longest_side_and_top_left_crop(image_id, size, scale):
    image, mask = _fg(image_id)
    bg_full = _hubble()  # 587 x 512: not square, so the crop position matters
    side = min(bg_full.shape[:2])
    # The expected background, computed here independently: the top-left square, resized.
    expected_bg = cv2.resize(bg_full[:side, :side], (size, size), interpolation=cv2.INTER_AREA)
    bg = compose.prepare_background(bg_full, size)
    assert np.array_equal(bg, expected_bg)
    off = bg_full.shape[1] - side  # a centre or right crop would differ
    assert not np.array_equal(bg, cv2.resize(bg_full[:, off:], (size, size), interpolation=cv2.INTER_AREA))

    cut = compose.make_cutout(image, mask, size=size, object_scale=scale)
    xy = compose.paste_position(size, cut.size)
    out = compose.composite(bg, cut, xy)
    (x0, y0, x1, y1), changed = _changed_box(out, expected_bg)
    want = round(scale * size)
    assert max(cut.size) == want
    assert abs(max(x1 - x0, y1 - y0) - want) <= 1, (x0, y0, x1, y1)
    # centred: the cut-out's box centre is the image centre, and all that changed lies inside it
    # (thin parts, the tank's antennas, vanish at 97 px: the visible box may be smaller)
    x, y = xy
    assert abs(x + cut.size[0] / 2 - size / 2) <= 0.5 and abs(y + cut.size[1] / 2 - size / 2) <= 0.5
    assert x <= x0 and y <= y0 and x1 <= x + cut.size[0] and y1 <= y + cut.size[1]
    # outside the object, the output is exactly the background
    assert np.array_equal(out[~changed], expected_bg[~changed])
    # inside, hard mask: pixels are the photo's resized pixels, not blends
    inside = cut.alpha > 0
    assert np.array_equal(out[y:y + cut.size[1], x:x + cut.size[0]][inside], cut.bgr[inside])


def test_mask_resized_to_exact_image_size():
    """Upstream masks are ~1600 px while images are <= 1024 px, with independent rounding (the
    sample's lighthouse: a 638 x 960 photo, a 1063 x 1600 mask)."""
    image_id = LIGHTHOUSE
    image = compose.decode(OI / "validation" / f"{image_id}.jpg", upright=False)
    raw = compose.decode_mask(OI / "validation-masks" / SAMPLE[image_id])
    assert raw.shape != image.shape[:2]
    assert abs(raw.shape[1] / image.shape[1] - raw.shape[0] / image.shape[0]) > 1e-4  # not one exact factor
    m = compose.mask_to_image(raw, image.shape[1], image.shape[0])
    assert m.shape == image.shape[:2] and m.dtype == bool
    assert 0.3 < m.mean() < 0.6  # the tower, not the sky around it


def test_tight_box_and_empty_mask():
    m = np.zeros((10, 20), bool)
    assert compose.tight_box(m) is None
    m[3:5, 7:12] = True
    assert compose.tight_box(m) == (7, 3, 12, 5)
    with pytest.raises(compose.BadInputError, match="empty mask"):
        compose.make_cutout(np.zeros((10, 20, 3), np.uint8), np.zeros((10, 20), bool), size=64)


def test_feather_and_erode():
    image, mask = _fg(SEA_LION)
    hard = compose.make_cutout(image, mask, size=256)
    assert set(np.unique(hard.alpha)) == {0, 255} and hard.hard
    soft = compose.make_cutout(image, mask, size=256, feather=2.0)
    assert not soft.hard and len(np.unique(soft.alpha)) > 10
    eroded = compose.make_cutout(image, mask, size=256, erode=3)
    assert (eroded.alpha > 0).sum() < (hard.alpha > 0).sum()
    assert not np.any((eroded.alpha > 0) & (hard.alpha == 0))  # erosion only removes
    bg = compose.prepare_background(_hubble(), 256)
    out = compose.composite(bg, soft, compose.paste_position(256, soft.size))
    x, y = compose.paste_position(256, soft.size)
    region = out[y:y + soft.size[1], x:x + soft.size[0]].astype(int)
    a = soft.alpha[:, :, None] / 255.0
    expected = soft.bgr * a + bg[y:y + soft.size[1], x:x + soft.size[0]] * (1 - a)
    assert np.abs(region - expected).max() <= 1  # an alpha blend, rounded


def test_random_placement_is_seeded_and_inside():
    image, mask = _fg(TANK)
    cut = compose.make_cutout(image, mask, size=128)
    spots = {compose.paste_position(128, cut.size, "random", key=f"0:fg:{k}") for k in range(20)}
    assert len(spots) > 5
    for x, y in spots:
        assert 0 <= x <= 128 - cut.size[0] and 0 <= y <= 128 - cut.size[1]
    assert compose.paste_position(128, cut.size, "random", key="a") == compose.paste_position(128, cut.size, "random",
                                                                                              key="a")


def test_decode_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(compose.BadInputError, match="bad.jpg.*cannot decode"):
        compose.decode(bad)
    with pytest.raises(compose.BadInputError, match="missing.png.*no such file"):
        compose.decode_mask(tmp_path / "missing.png")
    empty = tmp_path / "empty.png"
    cv2.imwrite(str(empty), np.zeros((8, 8), np.uint8))
    with pytest.raises(compose.BadInputError, match="mask is empty"):
        compose.load_foreground(OI / "validation" / f"{ZEBRA}.jpg", empty)


def test_png_round_trip_and_pixel_hash():
    img = compose.prepare_background(_hubble(), 64)
    data = compose.encode(img)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(back, img)  # lossless
    assert compose.pixel_sha256(back) == compose.pixel_sha256(img)
    import hashlib

    assert compose.pixel_sha256(img) == hashlib.sha256(img[:, :, ::-1].tobytes()).hexdigest()


def test_huge_declared_sizes_are_refused_before_decoding(tmp_path):
    from tests.fixtures.images import png_declaring

    bg = tmp_path / "huge.png"
    bg.write_bytes(png_declaring(40000, 40000))  # OpenCV: an assertion traceback
    with pytest.raises(compose.BadInputError, match=r"huge\.png: the file declares 40000 x 40000 px \(1600 M px\)"):
        compose.decode(bg)
    mask = tmp_path / "mask.png"
    mask.write_bytes(png_declaring(20000, 20000, depth=1, colour=0, rows=20000))  # a whole, empty 1-bit mask
    assert mask.stat().st_size < 100_000  # about 50 KB that would decode to 400 MB, then 1.5 GB in all
    with pytest.raises(compose.BadInputError, match=r"mask\.png: the file declares 20000 x 20000 px"):
        compose.load_foreground(next((OI / "validation").glob("*.jpg")), mask)
