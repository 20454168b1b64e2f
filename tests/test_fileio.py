"""Atomic writes (a real full disk too), one writer per folder (real processes), resumable downloads
and safe archive extraction."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from bitlab import fileio
from bitlab.errors import BitlabError
from tests.fixtures.processes import ENV


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    fileio.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with fileio.atomic_write(target, "w") as f:
            f.write('{"v": 2')
            raise RuntimeError("crash mid-write")
    assert fileio.json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    # Datasets and figures are shared: a file only its owner can read breaks a shared copy.
    umask = fileio.os.umask(0o022)
    fileio.os.umask(umask)
    fileio.write_text(tmp_path / "a.txt", "x")
    fileio.write_bytes(tmp_path / "b.bin", b"x")
    for name in ("a.txt", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_download_restarts_when_server_ignores_range(tmp_path, http_server):
    data = bytes(range(256)) * 1000
    url = http_server.add("f.bin", data)
    http_server.truncate["f.bin"] = 1
    http_server.ignore_range = True
    out = fileio.download(url, tmp_path / "f.bin", progress=False, md5=fileio.hashlib.md5(data).hexdigest())
    assert out.read_bytes() == data


def test_http_404_fails_fast_with_the_url(tmp_path, http_server):
    with pytest.raises(fileio.DownloadError, match=r"/nope\.bin: HTTP 404"):
        fileio.download(f"{http_server.url}/nope.bin", tmp_path / "x", progress=False)
    assert len(http_server.requests) == 1


def test_zip_extraction_refuses_escaping_members(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good/one.png", b"1")
        zf.writestr("two.png", b"2")
        zf.writestr("../evil.png", b"x")
        zf.writestr("/abs.png", b"y")
    out = tmp_path / "out"
    got = fileio.extract_zip_members(archive, out, ["two.png"])  # only what is asked for
    assert [p.name for p in got] == ["two.png"] and not (out / "good").exists()
    for bad in ("../evil.png", "/abs.png"):
        with pytest.raises(fileio.UnsafeArchiveError, match="outside|absolute"):
            fileio.extract_zip_members(archive, out, ["good/one.png", bad])
    assert not (tmp_path / "evil.png").exists() and not (out / "good").exists()  # checked before writing
    with pytest.raises(fileio.BitlabError, match="missing member"):
        fileio.extract_zip_members(archive, out, ["nope.png"])


def test_write_bytes_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "a.bin"
    fileio.write_bytes(target, b"old", fsync=False)  # creates the folder
    real_write = fileio.os.write

    def failing_write(fd, data):
        real_write(fd, bytes(data[:1]))
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_bytes(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]
    fileio.write_bytes(target, b"x" * 3_000_000)  # large writes loop until every byte is out
    assert target.stat().st_size == 3_000_000


# ----------------------------------------------------------------------------- schemes, redirects, caps
def test_only_http_and_https_urls_are_downloaded(tmp_path):
    private = tmp_path / "private.jpg"
    private.write_bytes(b"secret bytes")
    for url in (private.as_uri(), "file:///dev/zero", "ftp://127.0.0.1/x", "data:,hello", str(private)):
        with pytest.raises(fileio.UnsafeURLError, match="only http:// and https:// URLs are fetched"):
            fileio.download(url, tmp_path / "out" / "x.jpg", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["file:///{private}", "ftp://127.0.0.1:9/x.jpg", "data:,x"])
def test_a_redirect_to_another_scheme_is_refused_at_once(tmp_path, http_server, target):
    private = tmp_path / "private.jpg"
    private.write_bytes(b"secret bytes")
    http_server.redirect["img.jpg"] = target.format(private=str(private).lstrip("/"))
    with pytest.raises(fileio.UnsafeURLError, match=r"img\.jpg: the server redirects to (file|ftp|data):"):
        fileio.download(f"{http_server.url}/img.jpg", tmp_path / "out.jpg", progress=False)
    assert len(http_server.requests) == 1  # not retried
    assert not list(tmp_path.glob("out.jpg*"))


def test_a_redirect_within_http_is_followed(tmp_path, http_server):
    url = http_server.add("real.bin", b"payload")
    http_server.redirect["moved.bin"] = url
    assert fileio.download(f"{http_server.url}/moved.bin", tmp_path / "f", progress=False).read_bytes() == b"payload"


def test_download_size_cap(tmp_path, http_server):
    url = http_server.add("big.bin", bytes(3 << 20))
    with pytest.raises(fileio.DownloadTooLargeError, match=r"big\.bin: announces 3145728 bytes, more than .* 1048576"):
        fileio.download(url, tmp_path / "big.bin", progress=False, max_bytes=1 << 20)
    assert len(http_server.requests) == 1 and not list(tmp_path.glob("big.bin*"))
    # a body without Content-Length (a URL onto /dev/zero) is cut at the cap, not at a full disk
    http_server.stream["zero"] = 64 << 20
    with pytest.raises(fileio.DownloadTooLargeError, match=r"zero: more than the download limit of 1048576 bytes"):
        fileio.download(f"{http_server.url}/zero", tmp_path / "zero", progress=False, max_bytes=1 << 20)
    assert not list(tmp_path.glob("zero*"))
    assert fileio.download(url, tmp_path / "ok.bin", progress=False, max_bytes=3 << 20).stat().st_size == 3 << 20
    with pytest.raises(fileio.DownloadTooLargeError, match="larger than 100 bytes"):
        fileio.read_url(f"{http_server.url}/zero", max_bytes=100)


@pytest.mark.parametrize("size_on_416", [True, False])
def test_a_stale_longer_part_and_a_416_start_again(tmp_path, http_server, size_on_416):
    data = bytes(range(256)) * 40
    url = http_server.add("f.bin", data)
    http_server.size_on_416 = size_on_416
    (tmp_path / "f.bin.part").write_bytes(b"stale " * 3000)  # longer than the file: the server answers 416
    assert fileio.download(url, tmp_path / "f.bin", progress=False).read_bytes() == data
    assert [r for _, _, r in http_server.requests] == [f"bytes={6 * 3000}-", None]


def test_a_complete_part_and_a_416_with_its_size_is_kept(tmp_path, http_server):
    data = bytes(range(256)) * 40
    url = http_server.add("f.bin", data)
    (tmp_path / "f.bin.part").write_bytes(data)  # a run killed between the last byte and the rename
    assert fileio.download(url, tmp_path / "f.bin", progress=False).read_bytes() == data
    assert len(http_server.requests) == 1


def _whole_zip(path):
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            zf.testzip()
    except zipfile.BadZipFile as e:
        raise fileio.BitlabError(f"not a whole zip ({e})") from None


def test_a_body_cut_short_without_content_length_never_becomes_the_file(tmp_path, http_server):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", bytes(range(256)) * 200)
    url = http_server.add("a.zip", archive.read_bytes())
    http_server.no_length.add("a.zip")
    http_server.truncate["a.zip"] = 99  # every answer stops halfway, and nothing says so
    with pytest.raises(fileio.DownloadError, match=r"a\.zip: gave up after 3 attempts: not a whole zip"):
        fileio.download(url, tmp_path / "got.zip", progress=False, verify=_whole_zip)
    assert not list(tmp_path.glob("got.zip*"))
    http_server.truncate["a.zip"] = 1  # a later attempt gets it all
    got = fileio.download(url, tmp_path / "got.zip", progress=False, verify=_whole_zip)
    assert got.read_bytes() == archive.read_bytes()


def test_parse_size():
    assert fileio.parse_size("8G") == 8 << 30 and fileio.parse_size("500M") == 500 << 20 and fileio.parse_size("100mb") == 100 << 20
    assert fileio.parse_size("1MiB") == 1 << 20 and fileio.parse_size("4096") == 4096 and fileio.parse_size("1.5K") == 1536
    for bad in ("", "abc", "-1M", "0", "8X", "nanG", "inf"):
        with pytest.raises(ValueError, match="is not a size"):
            fileio.parse_size(bad)


@pytest.mark.parametrize("origin,target,allowed", [
    ("https://example.org/a.npz", "http://example.org/a.npz", False),  # a downgrade
    ("https://example.org/a.npz", "ftp://example.org/a.npz", False),
    ("http://example.org/a.npz", "https://mirror.example.org/a.npz", True),  # an upgrade
    ("https://example.org/a.npz", "/elsewhere/a.npz", True),  # relative: same scheme
])
def test_the_redirect_rule(origin, target, allowed):
    """No https server runs here, so the handler that every download uses is called as urllib calls it."""
    import email.message
    import io as pyio
    import types
    import urllib.request

    headers = email.message.Message()
    headers["Location"] = target
    handler = fileio._SafeRedirect()
    handler.parent = types.SimpleNamespace(open=lambda request, timeout: request.full_url)  # where it would go
    request = urllib.request.Request(origin)
    request.timeout = 10
    if allowed:
        assert handler.http_error_302(request, pyio.BytesIO(), 302, "Found", headers) == urllib.parse.urljoin(
            origin, target)
    else:
        with pytest.raises(fileio.UnsafeURLError, match="never from https to http"):
            handler.http_error_302(request, pyio.BytesIO(), 302, "Found", headers)


# ----------------------------------------------------------------------------- a full disk
def test_a_full_disk_is_named_and_nothing_is_half_written(small_disk):
    """On a real 1 MiB tmpfs: each writer names its file and says the disk is full; the previous
    file stays whole, no temp file is left, an append is cut back to the line before."""
    import torch

    disk = small_disk("1M")
    fileio.write_json(disk / "a.json", {"v": 1})
    with pytest.raises(fileio.DiskFullError, match=r"a.json: cannot write this file, the disk is full \(errno ENOSPC"):
        with fileio.atomic_write(disk / "a.json", "wb") as f:
            f.write(bytes(2 << 20))
    assert json.loads((disk / "a.json").read_text()) == {"v": 1}
    with pytest.raises(fileio.DiskFullError, match="b.bin: cannot write"):
        fileio.write_bytes(disk / "b.bin", bytes(2 << 20))
    with pytest.raises(fileio.DiskFullError, match="c.pt: cannot write") as e:
        fileio.torch_save({"w": torch.zeros(1 << 19)}, disk / "c.pt")  # torch says only "enforce fail at inline_container"
    assert "inline_container" not in str(e.value)
    assert sorted(p.name for p in disk.iterdir()) == ["a.json"]
    fileio.append_text(disk / "log.jsonl", '{"step": 1}\n')
    with pytest.raises(fileio.DiskFullError, match="log.jsonl: cannot write"):
        fileio.append_text(disk / "log.jsonl", '{"step": 2, "x": "' + "x" * (2 << 20) + '"}\n')
    assert (disk / "log.jsonl").read_text() == '{"step": 1}\n'


# ----------------------------------------------------------------------------- one writer per folder
_HOLD = """
import os, sys, time
from bitlab import fileio
with fileio.lock_folder(sys.argv[1], "test-holder"):
    child = os.fork() if sys.argv[2:] == ["fork"] else 1  # a child that outlives it, as a loader worker may
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print("locked", child, flush=True)
    time.sleep(60)
"""


def _hold(folder, *args) -> tuple[subprocess.Popen, int]:
    """A real process holding `folder`'s lock: (the process, its forked child's pid or 1)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder), *args], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    word, child = proc.stdout.readline().split()
    assert word == "locked"
    return proc, int(child)


def test_a_live_holder_is_named_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    proc, _ = _hold(out)
    try:
        with pytest.raises(fileio.FolderInUseError) as e, fileio.lock_folder(out, "evaluate"):
            pass
        assert (f"{out} is in use by pid {proc.pid} on {fileio.HOST} (bitlab test-holder, since " in str(e.value)
                and str(e.value).endswith(f"wait for it or remove {out / '.lock'} if that process is gone"))
        with pytest.raises(fileio.FolderInUseError, match=f"in use by pid {proc.pid} "):
            fileio.check_not_in_use(out)  # readers refuse a folder being written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / ".lock").exists()  # left by the killed holder, but nobody holds it:
    fileio.check_not_in_use(out)  # readers go on (their record checks decide)
    with caplog.at_level(logging.WARNING, "bitlab"), fileio.lock_folder(out, "evaluate"):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert f"took over the lock of pid {proc.pid} (test-holder, since" in caplog.text
    assert list(out.iterdir()) == []  # released: the file goes


def test_a_forked_child_does_not_keep_a_killed_holders_lock(tmp_path):
    """Loader workers are forked children: the lock must die with the process that took it."""
    out = tmp_path / "out"
    proc, child = _hold(out, "fork")
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the child lives on
        with fileio.lock_folder(out, "next"):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


def test_another_hosts_lock_is_never_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "make-ooc",
                                           "since": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(fileio.FolderInUseError, match=r"in use by pid 1 on elsewhere \(bitlab make-ooc, since 2026-01-01"
                                                  r".*remove .*\.lock if that process is gone"), fileio.lock_folder(out, "x"):
        pass
    assert (out / ".lock").exists()


def test_processes_started_together_get_the_lock_one_at_a_time(tmp_path):
    """Four real processes try the same folder at the same instant: exactly one holds it."""
    start = time.time() + 3  # after every interpreter has started
    script = ("import sys, time\nfrom bitlab import fileio\ntime.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
              "try:\n    with fileio.lock_folder(sys.argv[1], 'race'):\n        print('got', flush=True)\n"
              "        time.sleep(2)\nexcept fileio.FolderInUseError as e:\n    print('refused', e)\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "out"), str(start)], env=ENV,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    said = sorted(p.communicate(timeout=60)[0].split(" ")[0].strip() for p in procs)
    assert said == ["got", "refused", "refused", "refused"]


def test_a_lock_is_reentrant_in_its_process_and_removes_the_folders_it_made(tmp_path):
    out = tmp_path / "a" / "b"
    with fileio.lock_folder(out, "outer"):
        with fileio.lock_folder(out, "inner"):  # a library call inside a command that locked the folder
            pass
        assert json.loads((out / ".lock").read_text())["command"] == "outer"  # still held
        fileio.check_not_in_use(out)  # its own writer may read it
    assert not (tmp_path / "a").exists()  # nothing else was put there
    with fileio.lock_folder(out, "x"):
        (out / "kept.txt").write_text("x")
    assert [p.name for p in out.iterdir()] == ["kept.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(BitlabError, match="file: exists and is not a folder"), fileio.lock_folder(tmp_path / "file", "x"):
        pass
