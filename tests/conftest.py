"""Shared fixtures: real CC0 photos, a real HTTP server on 127.0.0.1 for the download code, and real
small file systems for full-disk tests.

The whole suite runs offline with empty caches: models are pretrained by default, and a test that
forgets `pretrained=False` / `--random-init` must fail at once, clearly, instead of downloading
(set here, at import, before any test module imports huggingface_hub, which reads its switches
once; child processes inherit them).
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import http.server
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

_CACHES = Path(tempfile.mkdtemp(prefix="bitlab-test-caches-"))
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
# A port bound but never listening: every connection to it is refused at once (no timeout to wait).
_REFUSING = socket.socket()
_REFUSING.bind(("127.0.0.1", 0))
UNREACHABLE_URL = f"http://127.0.0.1:{_REFUSING.getsockname()[1]}/bit_models"
os.environ.update({
    "BITLAB_CACHE": str(_CACHES / "bitlab"),  # official BiT weights (and built-in data) land here
    "BITLAB_WEIGHTS_URL": UNREACHABLE_URL,  # the official bucket, as offline as the build machines are
    "HF_HUB_OFFLINE": "1",  # timm's hub weights: huggingface_hub's own switch
    "HF_HOME": str(_CACHES / "huggingface"),  # ... and an empty cache of its own
    "TORCH_HOME": str(_CACHES / "torch"),  # the few timm weights fetched by URL
})


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos from scikit-image's wheel (CC0 / public domain), RGB uint8."""
    import skimage.data as data

    return {"chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(),
            "astronaut": data.astronaut()}


class FixtureServer:
    """Serves files from `root` over HTTP with Range support and injectable faults.

    - `corrupt[path] = n`: the next n responses for `path` have one byte flipped;
    - `truncate[path] = n`: the next n responses stop halfway (connection closed early);
    - `headers[path] = {...}`: extra response headers (e.g. `x-goog-hash`);
    - `ignore_range`: answer Range requests with the whole file (200), as some servers do;
    - `no_length`: paths answered without Content-Length (the body ends when the connection
      closes, so a truncated one looks whole to the client);
    - `redirect[path] = location`: answer 302 with that Location (any scheme);
    - `stream[path] = n`: n zero bytes without Content-Length, like a URL onto /dev/zero;
    - `size_on_416`: a 416 says the file's real size (`Content-Range: bytes */N`), as RFC 9110 asks;
    - `requests`: (method, path, Range header) of every request received.
    HEAD is answered as GET without the body (huggingface_hub asks for a file's metadata so).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.corrupt: dict[str, int] = {}
        self.truncate: dict[str, int] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.ignore_range = False
        self.no_length: set[str] = set()
        self.redirect: dict[str, str] = {}
        self.stream: dict[str, int] = {}
        self.size_on_416 = True
        self.requests: list[tuple[str, str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
                self.do_GET(send_body=False)

            def do_GET(self, send_body: bool = True) -> None:  # noqa: N802 (http.server naming)
                path = self.path.split("?")[0].lstrip("/")
                server.requests.append(("GET" if send_body else "HEAD", path, self.headers.get("Range")))
                if path in server.redirect:
                    self.send_response(302)
                    self.send_header("Location", server.redirect[path])
                    self.end_headers()
                    return
                if path in server.stream:
                    self.send_response(200)
                    self.end_headers()
                    block = bytes(1 << 16)
                    for _ in range(server.stream[path] // len(block)):
                        try:
                            self.wfile.write(block)
                        except OSError:  # the client stopped reading: as it should
                            return
                    return
                file = server.root / path
                if not file.is_file():
                    self.send_error(404)
                    return
                body = file.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        if server.size_on_416:
                            self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                if send_body and server.corrupt.get(path, 0) > 0:
                    server.corrupt[path] -= 1
                    payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
                if path not in server.no_length:
                    self.send_header("Content-Length", str(len(payload)))
                for k, v in server.headers.get(path, {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if not send_body:
                    return
                if server.truncate.get(path, 0) > 0:
                    server.truncate[path] -= 1
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, relpath: str, data: bytes, *, goog_md5: bool = False) -> str:
        """Write a fixture file; returns its URL. `goog_md5` announces its MD5 as cloud storage does."""
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if goog_md5:
            md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
            self.headers[relpath] = {"x-goog-hash": f"crc32c=AAAAAA==, md5={md5}"}
        return f"{self.url}/{relpath}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(tmp_path: Path):
    server = FixtureServer(tmp_path / "served")
    server.root.mkdir()
    yield server
    server.close()


@pytest.fixture
def small_disk(tmp_path: Path):
    """`small_disk("2M")`: a real tmpfs of that size (tests/fixtures/disks.py), unmounted after the test."""
    from tests.fixtures.disks import small_disks

    yield from small_disks(tmp_path)
