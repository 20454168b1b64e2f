"""Image sizes from headers: real files of every format OpenCV writes, and hand-made headers."""
from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from bitlab.data import imagesize
from bitlab.data.transforms import BadImageError
from tests.fixtures.images import jpeg_declaring, png_declaring


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff", ".webp", ".ppm", ".pgm"])
def test_sizes_of_real_files(ext, photos):
    img = cv2.cvtColor(photos["coffee"][:301, :457], cv2.COLOR_RGB2BGR)
    if ext == ".pgm":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    data = cv2.imencode(ext, img)[1]
    assert imagesize.image_size(data) == (457, 301)
    assert imagesize.image_size(data.tobytes()) == (457, 301)


def test_webp_lossless_gif_and_odd_headers(photos):
    img = cv2.cvtColor(photos["chelsea"][:77, :131], cv2.COLOR_RGB2BGR)
    assert imagesize.image_size(cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 101])[1]) == (131, 77)
    assert imagesize.image_size(b"GIF89a" + struct.pack("<HH", 640, 480) + bytes(8)) == (640, 480)
    assert imagesize.image_size(b"P6\n# a comment\n 12 # more\n 34\n255\n") == (12, 34)
    assert imagesize.jpeg_size(np.frombuffer(jpeg_declaring(300, 200), np.uint8)) == (200, 300)
    for junk in (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"II*\x00", b"text"):
        assert imagesize.image_size(junk) is None


def test_the_limit_is_above_the_largest_camera_frames():
    assert 14204 * 10652 < imagesize.MAX_IMAGE_PIXELS  # a 150 MP medium-format frame
    imagesize.check_pixels(png_declaring(14204, 10652), "ok.png", BadImageError)
    with pytest.raises(BadImageError, match=r"big\.png: the file declares 20000 x 20000 px \(400 M px\)"):
        imagesize.check_pixels(png_declaring(20000, 20000), "big.png", BadImageError)
