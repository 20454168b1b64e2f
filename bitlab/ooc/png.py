"""A fast lossless PNG writer for the 8-bit RGB composites of make-ooc.

Encoding is most of make-ooc's cost, and photos gain little from zlib's LZ77 search. On 512 px
composites (benchmarks/RESULTS.md, "make-ooc") OpenCV's fastest lossless setting takes ~7 ms per
image; the same pixels with PNG's Up row filter, deflated by Intel's ISA-L (the `isal` package),
take ~2.5 ms, for files about the size OpenCV's default setting makes (50% of the raw pixels
against 48%). The file is a plain PNG (one IHDR, one IDAT, IEND) that every decoder reads back to
exactly the composite's pixels.
"""
from __future__ import annotations

import struct

import cv2
import numpy as np
from isal import isal_zlib

from bitlab.errors import BitlabError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# ISA-L has levels 0-3; on photo composites 2 is 2-3% smaller than 1 for ~5% more time, and 3
# saves little more for ~20% more time.
LEVEL = 2
_UP = 2  # PNG filter type: each byte minus the byte above it (the row above is 0 for the first row)


def _chunk(kind: bytes, data: bytes) -> list[bytes]:
    crc = isal_zlib.crc32(data, isal_zlib.crc32(kind)) & 0xFFFFFFFF
    return [struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)]


def encode_bgr(bgr: np.ndarray) -> bytes:
    """A PNG (8-bit RGB, no interlace) of a BGR uint8 HxWx3 image, as OpenCV stores images."""
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3 or not bgr.size:
        raise BitlabError(f"PNG writer takes a non-empty HxWx3 uint8 image, got {bgr.dtype} {bgr.shape}")
    h, w = bgr.shape[:2]
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).reshape(h, 3 * w)
    rows = np.empty((h, 1 + 3 * w), np.uint8)  # each row: its filter type byte, then the filtered bytes
    rows[:, 0] = _UP
    rows[0, 1:] = rgb[0]
    np.subtract(rgb[1:], rgb[:-1], out=rows[1:, 1:])  # uint8 wrap-around is PNG's modulo-256
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, adaptive, no interlace
    return b"".join([SIGNATURE, *_chunk(b"IHDR", ihdr), *_chunk(b"IDAT", isal_zlib.compress(rows, LEVEL)),
                     *_chunk(b"IEND", b"")])
