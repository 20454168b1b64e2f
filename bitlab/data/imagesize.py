"""Image dimensions from file headers, read before decoding.

OpenCV allocates the whole pixel buffer that a header declares before it decodes a byte, and
past its own limit (2^30 px) it fails an assertion with a traceback: a 48 KB PNG declaring
20000 x 20000 costs 1.5 GB before anything can say it is unusable. Every decoder in bitlab calls
`imdecode` (or `check_pixels`) first. PNG (IHDR), JPEG (SOF), GIF, BMP, WebP, TIFF and PNM
headers are read here, a few bytes each; any other format goes to OpenCV, whose own limit then
applies and whose assertion becomes an ordinary "cannot decode".
"""
from __future__ import annotations

import re
import struct
from typing import Union

import cv2
import numpy as np

# 2^28 = 268 M px (805 MB as 8-bit BGR): above the largest camera frames (a 150 MP medium-format
# back gives 151 M px), so only a damaged or hostile file, or a giant stitched panorama, is refused.
MAX_IMAGE_PIXELS = 1 << 28

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]

# Start-of-frame markers (baseline, progressive, lossless...): their segment holds height and width.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def imdecode(data: np.ndarray, flags: int, name: str, error: type[Exception]) -> np.ndarray | None:
    """`cv2.imdecode` after `check_pixels`; None for bytes OpenCV cannot decode (as cv2.imdecode)."""
    if not data.size:
        return None
    check_pixels(data, name, error)
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:  # e.g. its own pixel limit, for a format whose header is not read here
        return None


def check_pixels(data: Buffer, name: str, error: type[Exception]) -> None:
    """Raise `error` naming `name` when the header declares more than `MAX_IMAGE_PIXELS` pixels."""
    size = image_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        w, h = size
        raise error(f"{name}: the file declares {w} x {h} px ({w * h / 1e6:.0f} M px), more than the "
                    f"{MAX_IMAGE_PIXELS / 1e6:.0f} M px bitlab decodes (damaged, or not a photo)")


def image_size(data: Buffer) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, GIF, BMP, WebP, TIFF or PNM file; None
    for other formats and unreadable headers."""
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    try:
        for parse in (_png, _jpeg, _gif, _bmp, _webp, _tiff, _pnm):
            if (size := parse(buf)) is not None:
                return size
    except (struct.error, IndexError, ValueError):  # a header cut short
        return None
    return None


def jpeg_size(data: Buffer) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None if `data` is not a readable JPEG."""
    buf = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else data
    try:
        size = _jpeg(buf)
    except (struct.error, IndexError):
        return None
    return None if size is None else (size[1], size[0])


def _png(b) -> tuple[int, int] | None:
    if bytes(b[:8]) != b"\x89PNG\r\n\x1a\n" or bytes(b[12:16]) != b"IHDR":
        return None
    return struct.unpack_from(">II", b, 16)


def _jpeg(b) -> tuple[int, int] | None:
    if bytes(b[:2]) != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(b):  # segment by segment: the frame header may follow large EXIF blocks
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF:
            h, w = struct.unpack_from(">HH", b, i + 5)
            return w, h
        i += 2 + struct.unpack_from(">H", b, i + 2)[0]
    return None


def _gif(b) -> tuple[int, int] | None:
    return struct.unpack_from("<HH", b, 6) if bytes(b[:6]) in (b"GIF87a", b"GIF89a") else None


def _bmp(b) -> tuple[int, int] | None:
    if bytes(b[:2]) != b"BM":
        return None
    if struct.unpack_from("<I", b, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return struct.unpack_from("<HH", b, 18)
    w, h = struct.unpack_from("<ii", b, 18)
    return abs(w), abs(h)  # a negative height means top-down rows


def _webp(b) -> tuple[int, int] | None:
    if bytes(b[:4]) != b"RIFF" or bytes(b[8:12]) != b"WEBP":
        return None
    chunk = bytes(b[12:16])
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        w, h = struct.unpack_from("<HH", b, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":  # lossless: 14-bit (size - 1) fields packed after the signature byte
        bits = struct.unpack_from("<I", b, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(b) >= 30:  # extended: 24-bit (size - 1) fields
        return int.from_bytes(b[24:27], "little") + 1, int.from_bytes(b[27:30], "little") + 1
    return None


def _tiff(b) -> tuple[int, int] | None:
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(bytes(b[:4]))
    if order is None:
        return None
    ifd = struct.unpack_from(order + "I", b, 4)[0]
    found = {}
    for k in range(struct.unpack_from(order + "H", b, ifd)[0]):
        tag, kind = struct.unpack_from(order + "HH", b, ifd + 2 + 12 * k)
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            found[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), b, ifd + 2 + 12 * k + 8)[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _pnm(b) -> tuple[int, int] | None:
    head = bytes(b[:512])
    if len(head) < 2 or head[0:1] != b"P" or head[1:2] not in b"123456":
        return None
    fields = re.sub(rb"#[^\n]*", b" ", head[2:]).split()  # comments may sit between the numbers
    return int(fields[0]), int(fields[1])
