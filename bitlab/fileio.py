"""Files and the network: atomic writes, one writer per folder, checksums, resumable HTTP
downloads, safe extraction.

Everything that writes a file a user keeps goes through `atomic_write` (temp file in the same
folder, then `os.replace`), so an interrupted job never leaves a half-written file behind; a full
disk is reported naming the file being written (`DiskFullError`). Every command that fills an
output folder holds that folder's `.lock` for its run (`lock_folder`), and readers refuse a folder
whose writer is still at work (`check_not_in_use`).

Every network read goes through `open_url`: http:// and https:// only (a URL that a server hands
us, e.g. a search API's answer, can never make bitlab read a local `file://`), redirects only to
http(s) and never from https down to http, and a byte cap on what one download may bring.
"""
from __future__ import annotations

import base64
import codecs
import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from tqdm.auto import tqdm

from bitlab.errors import BitlabError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# mkstemp creates files 0600; files users keep get the mode `open` would give them (0666 less the
# umask), read once here because os.umask can only be read by setting it.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


class DownloadError(BitlabError):
    """A download failed for good (after retries) or did not match its checksum."""


class UnsafeURLError(DownloadError):
    """A URL (or a redirect) to a scheme other than http(s), or from https down to http."""


class DownloadTooLargeError(DownloadError):
    """A download that announces or brings more bytes than its cap."""


class UnsafeArchiveError(BitlabError):
    """An archive member would be written outside the extraction folder."""


# ----------------------------------------------------------------------------- atomic writes
class DiskFullError(BitlabError):
    """No space left on the device (or over the quota) while writing a file; the message names it."""


# Both mean the same to the user: nothing more can be written until space is freed.
_NO_SPACE = {errno.ENOSPC: "ENOSPC: no space left on device", errno.EDQUOT: "EDQUOT: disk quota exceeded"}


def disk_full(path: str | os.PathLike, error: BaseException) -> DiskFullError | None:
    """The `DiskFullError` naming `path` when `error` is a write that found no space, else None."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return DiskFullError(f"{path}: cannot write this file, the disk is full (errno {_NO_SPACE[error.errno]}); "
                             "nothing half-written was kept: free some space and rerun")
    return None


@contextlib.contextmanager
def naming_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Inside the block, a write that finds no space raises `DiskFullError` naming `path`."""
    try:
        yield
    except OSError as e:
        if (full := disk_full(path, e)) is not None:
            raise full from None
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True, **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside `path`; on success rename it over `path`, on error delete it.

    `fsync=False` still never shows a partial file to other processes (the rename is atomic),
    but a power cut may lose the data; bulk writers that verify checksums on resume use it.
    A full disk raises `DiskFullError` naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_full_disk(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if (full := disk_full(path, e)) is not None:
            raise full from None
        raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` (UTF-8) to `path` whole or not at all: a write cut short by a full disk is cut
    back to the file's previous end, then `DiskFullError` (logs read line by line stay whole)."""
    data = memoryview(text.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if (full := disk_full(path, e)) is not None:
                raise full from None
            raise
    finally:
        os.close(fd)


def check_can_create_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse (BitlabError naming `flag`) a folder that is neither there nor makeable, without
    creating anything: for commands that would otherwise find out only after long work."""
    p = Path(path).absolute()
    if p.exists():
        if not p.is_dir():
            raise BitlabError(f"{flag} {path}: exists and is not a folder")
        return
    ancestor = next(a for a in p.parents if a.exists())
    if not ancestor.is_dir():
        raise BitlabError(f"{flag} {path}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise BitlabError(f"{flag} {path}: no permission to create folders in {ancestor}")


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> None:
    """`atomic_write` for bytes in hand, on bare file descriptors: a third cheaper per file, which
    counts for bulk writers (make-ooc writes thousands). The temp name is unique per thread."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if (full := disk_full(path, e)) is not None:
            raise full from None
        raise


def text_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a UTF-8 text file, line ends kept (for `csv.reader`), a leading BOM dropped.

    Lines are decoded one at a time, so a byte that is not UTF-8 is reported with its line and
    column (`BitlabError`) instead of as a bare `UnicodeDecodeError`, and the file is never held
    in memory whole. The file is opened here: a missing one raises `FileNotFoundError` at once.
    """
    f = open(path, "rb")
    return _decoded_lines(f, path)


def _decoded_lines(f: IO[bytes], path: str | os.PathLike) -> Iterator[str]:
    with f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # as spreadsheet programs save "CSV UTF-8"
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
                raise BitlabError(f"{path} line {n}: byte 0x{raw[e.start]:02x} at column {column} is not UTF-8 "
                                  "text; save the file as UTF-8") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class _WriteErrors:
    """A file's `write` that keeps the OSError it raised: torch's writer turns it into a
    RuntimeError ('[enforce fail at inline_container.cc...] unexpected pos') that names no cause."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` through a temp file, so a crash mid-save keeps the previous file intact (a full
    disk: `DiskFullError` naming `path`)."""
    import torch

    with atomic_write(path, "wb") as f:
        sink = _WriteErrors(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None  # the real cause, which atomic_write words
            raise


def torch_load(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """`torch.load` with `weights_only=True`: checkpoints can never execute code. `mmap`: tensors stay
    on disk until touched (to read a file's small entries without its weights)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise BitlabError(f"{path}: no such file") from None
    except pickle.UnpicklingError:
        raise BitlabError(f"{path}: {_pickled_objects(path)}") from None
    except Exception as e:  # pickle / zip errors are cryptic; name the file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise BitlabError(f"{path}: not a readable torch checkpoint ({type(e).__name__}"
                          + (f": {detail})" if detail and "weights_only" not in str(e) else ")")) from None


def _pickled_objects(path: str | os.PathLike) -> str:
    """What a torch file that the safe loader refuses holds, and how to convert it without risk.

    torch's own message suggests turning the protection off; bitlab never relays that advice.
    """
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a legacy (pre-zip) file or a damaged one: the types cannot be listed
        names = []
    what = (f"Python objects besides tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            if names else "Python objects besides tensors")
    return (f"a torch file holding pickled {what}, such as a whole model saved with torch.save(model); "
            "bitlab loads only tensors and plain containers, because unpickling other objects can run "
            "arbitrary code. To convert it safely: if you trust its source, open it in an isolated "
            "environment with the code that wrote it and save only the weights, "
            "torch.save(model.state_dict(), 'weights.pt'), then use weights.pt (or ask its publisher for "
            "an .npz or a state dict)")


# ----------------------------------------------------------------------------- one writer per folder
LOCK_FILE = ".lock"
HOST = socket.gethostname()


class FolderInUseError(BitlabError):
    """Another process holds the folder's lock: it is writing there now."""


class FolderLock:
    """`FOLDER/.lock`, held by one process at a time for a whole command (`lock_folder`).

    The file says who holds it (pid, host, command, since when); the hold itself is an `flock` on
    it, which the kernel drops when the holder dies, however it dies (forked children, such as
    loader workers, close their copy at once: `_forget_in_child`). So a lock file left by a killed
    run on this host is stale: the next run takes it over and logs so. One written on another host
    is never taken over (whether that process lives cannot be seen from here, and not every network
    file system shares locks between hosts): the error says to remove it if that process is gone.
    (Not POSIX `lockf` locks: any close of the file anywhere in the process would drop those.)
    Re-entrant within a process (a library call inside a command that locked the folder already);
    a folder that the lock created is removed on release when nothing else was put in it.
    """

    _held: dict[Path, "FolderLock"] = {}  # this process's locks, by lock file
    _guard = threading.Lock()

    def __init__(self, folder: str | os.PathLike, command: str) -> None:
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_FILE
        self.key = self.path.absolute()
        self.depth, self._fd, self._made, self._outer = 0, -1, [], None

    def __enter__(self) -> "FolderLock":
        with self._guard:
            self._outer = self._held.get(self.key)
            if self._outer is not None:
                self._outer.depth += 1
                return self
        self._made = _make_folder(self.folder)
        try:
            self._fd = self._take()
        except BaseException:
            _remove_empty(self._made)
            raise
        with self._guard:
            self._held[self.key] = self
        return self

    def _take(self) -> int:
        """The locked, current lock file's descriptor, our record written into it."""
        deadline = time.monotonic() + 0.5
        while True:
            with naming_full_disk(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                # A reader's check holds the lock for a moment (`check_not_in_use`), also on a stale
                # file; a live writer holds it with its own record: only that one is refused at once.
                if (holder is None or not _alive(holder)) and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise FolderInUseError(_in_use(self.folder, holder)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released (unlinked) between our open and lock: lock the new file
        previous = _holder(fd)
        if previous is not None and previous.get("host") != HOST:
            os.close(fd)
            raise FolderInUseError(_in_use(self.folder, previous))
        if previous is not None:
            log.warning("%s: took over the lock of pid %s (%s, since %s), which is no longer running; its "
                        "unfinished work there is redone or resumed", self.folder, previous.get("pid"),
                        previous.get("command"), previous.get("since"))
        record = {"pid": os.getpid(), "host": HOST, "command": self.command, "argv": sys.argv,
                  "since": datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            with naming_full_disk(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def __exit__(self, *exc: Any) -> None:
        with self._guard:
            if self._outer is not None:
                self._outer.depth -= 1
                return
            del self._held[self.key]
        try:
            if _same_file(self._fd, self.path):  # unlinked while still held: nobody takes the old file
                self.path.unlink()
        finally:
            os.close(self._fd)
        _remove_empty(self._made)


def lock_folder(folder: str | os.PathLike, command: str) -> FolderLock:
    """`with lock_folder(OUT, "make-ooc"):` one writer per output folder (`FolderLock`); a folder in
    use raises `FolderInUseError` naming the holder's pid, host and command."""
    return FolderLock(folder, command)


def check_not_in_use(folder: str | os.PathLike) -> None:
    """Readers: refuse (`FolderInUseError`) a folder whose writer is at work. A lock file that no
    process holds (left by a killed run) is ignored here: the reader's record checks decide."""
    path = Path(folder) / LOCK_FILE
    if path.absolute() in FolderLock._held:  # this process writes it
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderInUseError(_in_use(Path(folder), _holder(fd))) from None
    finally:
        os.close(fd)  # which also drops the shared lock


def _forget_in_child() -> None:
    """After a fork: the child holds no folder, and closes its copies of the locked files, so that
    the lock lives exactly as long as the process that took it."""
    for lock in FolderLock._held.values():
        with contextlib.suppress(OSError):
            os.close(lock._fd)
    FolderLock._held = {}
    FolderLock._guard = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


def _alive(holder: dict) -> bool:
    """Whether a lock record's process may still run (another host's: unknown, so yes)."""
    if holder.get("host") != HOST or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` (and parents); returns those created, innermost first."""
    made = [p for p in (folder, *folder.absolute().parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BitlabError(f"{folder}: exists and is not a folder") from None
    except OSError as e:
        raise BitlabError(f"{folder}: cannot create this folder ({e.strerror})") from None
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()  # only an empty folder: never what someone else put there
        except OSError:
            return


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> dict | None:
    """The record a lock file holds (None: empty or unreadable)."""
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _in_use(folder: Path, holder: dict | None) -> str:
    who = ("another process" if holder is None else
           f"pid {holder.get('pid')} on {holder.get('host')} (bitlab {holder.get('command')}, since "
           f"{holder.get('since')})")
    return (f"{folder} is in use by {who}; wait for it or remove {folder / LOCK_FILE} if that process is gone")


# ----------------------------------------------------------------------------- checksums
def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _server_md5(headers: Any) -> str | None:
    """MD5 announced by the server: `x-goog-hash: md5=<b64>` (cloud storage) or `Content-MD5`."""
    for value in headers.get_all("x-goog-hash") or []:
        for part in value.split(","):
            key, _, b64 = part.strip().partition("=")
            if key == "md5" and b64:
                return base64.b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    if b64 := headers.get("Content-MD5"):
        return base64.b64decode(b64).hex()
    return None


# ----------------------------------------------------------------------------- URLs
URL_SCHEMES = ("http", "https")
# What one download may bring unless its caller says otherwise: 8 GiB, about twice the largest
# file any fetcher needs (BiT-M-R152x4.npz is 4.4 GB, OpenImages' train box CSV 2.3 GB), so that a
# server streaming without end fills no disk.
MAX_DOWNLOAD_BYTES = 8 << 30
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '123', '500K', '100M', '8G' or '1T' (1024-based; 'MB', 'MiB' read as 'M')."""
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = _SIZE_UNITS.get(value[-1:], 1)
    try:
        size = float(value[:-1] if unit > 1 else value) * unit
    except ValueError:
        size = float("nan")
    if not size >= 1 or size == float("inf"):  # also NaN
        raise ValueError(f"{text!r} is not a size such as 500M or 8G")
    return int(size)


def check_url(url: str) -> None:
    """Refuse (`UnsafeURLError`) a URL that is not http:// or https://."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise UnsafeURLError(f"{url}: only http:// and https:// URLs are fetched"
                             + (f", not {scheme}://" if scheme else " (this is not a URL)"))


class _SafeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to http(s), and never from https down to plain http.

    Checked before urllib's own rule (which would follow ftp:// and downgrades, and turns a
    file:// target into a retried HTTP error), so the refusal is immediate and says why.
    """

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: D102 (urllib's hook)
        target = headers.get("location") or headers.get("uri")
        if target:
            new = urllib.parse.urljoin(req.full_url, target)
            old_scheme, new_scheme = (urllib.parse.urlsplit(u).scheme.lower() for u in (req.full_url, new))
            if new_scheme not in URL_SCHEMES or (old_scheme == "https" and new_scheme != "https"):
                fp.close()
                raise UnsafeURLError(f"{req.full_url}: the server redirects to {new}; only redirects to "
                                     "http(s), and never from https to http, are followed")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _opener() -> urllib.request.OpenerDirector:
    """urllib's handlers for http(s) alone: no file://, ftp:// or data: handler to reach at all."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(), _SafeRedirect(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def open_url(url: str, *, headers: dict[str, str] | None = None, timeout: float = 60.0):
    """`urlopen` for http(s) URLs only, with the redirect rule above; returns the response."""
    check_url(url)
    request = urllib.request.Request(url, headers={"User-Agent": "bitlab", **(headers or {})})
    return _opener().open(request, timeout=timeout)


def read_url(url: str, *, max_bytes: int, headers: dict[str, str] | None = None, timeout: float = 60.0) -> bytes:
    """The body of `url` in memory (an API answer), refused beyond `max_bytes`."""
    data = bytearray()
    with open_url(url, headers=headers, timeout=timeout) as response:
        _check_announced(url, response, 0, max_bytes)
        while chunk := response.read(min(_CHUNK, max_bytes + 1 - len(data))):
            data += chunk
            if len(data) > max_bytes:
                raise DownloadTooLargeError(f"{url}: the answer is larger than {max_bytes} bytes")
    return bytes(data)


def _check_announced(url: str, response: Any, have: int, max_bytes: int) -> int | None:
    """The total size the response announces (Content-Length + bytes already held); refused over the cap."""
    length = response.headers.get("Content-Length")
    if length is None or not length.strip().isdigit():
        return None
    total = int(length) + have
    if total > max_bytes:
        raise DownloadTooLargeError(f"{url}: announces {total} bytes, more than the download limit of "
                                    f"{max_bytes} bytes (raise it with --max-download)")
    return total


# ----------------------------------------------------------------------------- downloads
def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Download `url` (http or https) to `dest`, resuming a partial `dest.part` with a Range request.

    The bytes must be whole (Content-Length or Content-Range when the server sends them), at most
    `max_bytes`, match `sha256`/`md5` when given and the MD5 the server announces (`x-goog-hash` /
    `Content-MD5`) when it does, and pass `verify(path)` (which raises `BitlabError` for bytes that
    are not what was asked for: an HTML error page, a truncated archive). Only then is the `.part`
    renamed to `dest`. A mismatch discards the bytes and retries; after `retries` attempts a
    `DownloadError` names the URL and the problem. A download over the cap or a refused URL or
    redirect is not retried. An existing `dest` that matches the expected digest and passes
    `verify` is kept without any network access.
    """
    check_url(url)
    dest = Path(dest)
    if dest.exists() and (sha256 or md5) and _matches(dest, sha256, md5) and not _verify_problem(dest, verify):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = ""
    for attempt in range(1, retries + 1):
        try:
            server_md5 = _fetch_into(url, part, timeout=timeout, progress=progress, max_bytes=max_bytes)
        except DownloadTooLargeError:
            part.unlink(missing_ok=True)
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as e:
            if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            last_error = f"{type(e).__name__}: {e}"
            log.warning("download %s failed (attempt %d/%d): %s", url, attempt, retries, last_error)
            time.sleep(min(2.0 ** (attempt - 1), 10.0) * 0.1)
            continue
        problems = _check(part, sha256=sha256, md5=md5, server_md5=server_md5)
        if not problems and (problem := _verify_problem(part, verify)):
            problems.append(problem)
        if not problems:
            os.replace(part, dest)
            return dest
        last_error = "; ".join(problems)
        log.warning("download %s: %s (attempt %d/%d)", url, last_error, attempt, retries)
        part.unlink(missing_ok=True)  # corrupt bytes are never resumed
    raise DownloadError(f"{url}: gave up after {retries} attempts: {last_error}")


def _verify_problem(path: Path, verify: Callable[[Path], None] | None) -> str:
    if verify is None:
        return ""
    try:
        verify(path)
    except BitlabError as e:
        return str(e)
    return ""


def _matches(path: Path, sha256: str | None, md5: str | None) -> bool:
    return not _check(path, sha256=sha256, md5=md5, server_md5=None)


def _check(path: Path, *, sha256: str | None, md5: str | None, server_md5: str | None) -> list[str]:
    problems = []
    if sha256 and (got := file_digest(path, "sha256")) != sha256.lower():
        problems.append(f"sha256 mismatch: expected {sha256}, got {got}")
    for name, want in (("md5", md5), ("server md5", server_md5)):
        if want and (got := file_digest(path, "md5")) != want.lower():
            problems.append(f"{name} mismatch: expected {want}, got {got}")
    return problems


def _content_range(response: Any) -> tuple[int | None, int | None]:
    """(first byte, total size) from `Content-Range: bytes FIRST-LAST/TOTAL` or `bytes */TOTAL`."""
    value = (response.headers.get("Content-Range") or "").strip()
    unit, _, spec = value.partition(" ")
    span, _, total = spec.partition("/")
    first = span.split("-")[0]
    return (int(first) if unit == "bytes" and first.isdigit() else None,
            int(total) if unit == "bytes" and total.isdigit() else None)


def _fetch_into(url: str, part: Path, *, timeout: float, progress: bool, max_bytes: int) -> str | None:
    """Append the missing bytes of `url` to `part`; return the server's MD5 if it sent one.

    Raises OSError when the bytes are known to be incomplete, `DownloadTooLargeError` past `max_bytes`.
    """
    have = part.stat().st_size if part.exists() else 0
    if have > max_bytes:
        part.unlink()
        have = 0
    try:
        response = open_url(url, headers={"Range": f"bytes={have}-"} if have else None, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # Range not satisfiable: the .part is complete only if it has exactly the server's size;
        # a stale, longer .part (the file changed upstream) or an unknown size starts afresh.
        size = _content_range(e)[1]
        if size != have:
            part.unlink()
            raise OSError(f"HTTP 416 for bytes {have}- (server size {size if size is not None else 'not given'}): "
                          "the partial file does not fit, starting again") from None
        return None
    with response:
        if have and response.status != 206:  # server ignored the Range: start again
            have = 0
        elif have and _content_range(response)[0] != have:  # a range other than the one asked for
            raise OSError(f"asked for bytes {have}-, the server sent {response.headers.get('Content-Range')!r}")
        total = _check_announced(url, response, have, max_bytes)
        if total is None and have:
            total = _content_range(response)[1]
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=Path(url).name,
            disable=not progress, leave=False,
        ) as bar:
            size = have
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise DownloadTooLargeError(f"{url}: more than the download limit of {max_bytes} bytes "
                                                "(raise it with --max-download)")
                f.write(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
        return _server_md5(response.headers)


# ----------------------------------------------------------------------------- archives
def safe_member_path(root: str | os.PathLike, member: str) -> Path:
    """Where `member` would land under `root`; raises if it escapes (absolute, `..`, drive)."""
    root = Path(root).resolve()
    target = (root / member).resolve()
    if not member or member.startswith(("/", "\\")) or member[1:2] == ":":
        raise UnsafeArchiveError(f"archive member {member!r} has an absolute or empty path")
    if target != root and root not in target.parents:
        raise UnsafeArchiveError(f"archive member {member!r} would be written outside {root}")
    return target


def extract_zip_members(
    archive: str | os.PathLike, dest: str | os.PathLike, members: Iterable[str] | None = None
) -> list[Path]:
    """Extract `members` (all when None) of a zip into `dest`, refusing any path that escapes.

    Every member path is checked before anything is written; each file is written atomically,
    and members already present with the right size are skipped (so re-runs resume).
    """
    archive, dest = Path(archive), Path(dest)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise BitlabError(f"{archive}: not a readable zip archive ({e})") from None
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        wanted = list(infos) if members is None else list(members)
        missing = [m for m in wanted if m not in infos]
        if missing:
            raise BitlabError(f"{archive}: missing member(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        targets = {m: safe_member_path(dest, m) for m in wanted}  # check all before writing any
        written = []
        for name, target in targets.items():
            info = infos[name]
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if target.exists() and target.stat().st_size == info.file_size:
                written.append(target)
                continue
            with zf.open(info) as src, atomic_write(target, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            written.append(target)
        return written
