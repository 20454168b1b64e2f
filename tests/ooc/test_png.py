"""bitlab's PNG writer: standard files that decode to exactly the input pixels."""
from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from bitlab.errors import BitlabError
from bitlab.ooc import png
from bitlab.paths import SAMPLE_DIR


def _photo() -> np.ndarray:
    img = cv2.imread(str(next((SAMPLE_DIR / "openimages" / "validation").glob("*.jpg"))))
    return np.ascontiguousarray(img[:123, :77])  # odd sizes: no row or stride assumption


@pytest.mark.parametrize("make", [_photo, lambda: np.zeros((1, 1, 3), np.uint8),
                                  lambda: np.random.default_rng(0).integers(0, 256, (5, 9, 3), dtype=np.uint8)])
def test_round_trip_through_two_decoders(make):
    img = make()
    data = png.encode_bgr(img)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), img)
    with Image.open(io.BytesIO(data)) as pil:
        pil.load()  # PIL checks every chunk's CRC and the zlib stream
        assert pil.mode == "RGB" and np.array_equal(np.asarray(pil), img[:, :, ::-1])


def test_chunks_and_filters_follow_the_png_spec():
    img = _photo()
    data = png.encode_bgr(img)
    assert data[:8] == png.SIGNATURE
    chunks, pos = [], 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, body, crc = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n], data[pos + 8 + n:pos + 12 + n]
        assert int.from_bytes(crc, "big") == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    h, w = img.shape[:2]
    assert chunks[0][1] == w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    rows = np.frombuffer(zlib.decompress(chunks[1][1]), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 2).all()  # Up filter on every row
    assert np.array_equal(np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8).reshape(h, w, 3), img[:, :, ::-1])


def test_smaller_than_raw_pixels():
    img = _photo()
    assert len(png.encode_bgr(img)) < 0.8 * img.nbytes


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.uint16), np.zeros((0, 4, 3), np.uint8)])
def test_refuses_what_it_cannot_write(bad):
    with pytest.raises(BitlabError, match="HxWx3 uint8"):
        png.encode_bgr(bad)
