"""Atomic writes, resumable downloads and safe archive extraction."""
import zipfile

import pytest

from bitlab import io


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_write(target, "w") as f:
            f.write('{"v": 2')
            raise RuntimeError("crash mid-write")
    assert io.json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    # Datasets and figures are shared: a file only its owner can read breaks a shared copy.
    umask = io.os.umask(0o022)
    io.os.umask(umask)
    io.write_text(tmp_path / "a.txt", "x")
    io.write_bytes(tmp_path / "b.bin", b"x")
    for name in ("a.txt", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_download_restarts_when_server_ignores_range(tmp_path, http_server):
    data = bytes(range(256)) * 1000
    url = http_server.add("f.bin", data)
    http_server.truncate["f.bin"] = 1
    http_server.ignore_range = True
    out = io.download(url, tmp_path / "f.bin", progress=False, md5=io.hashlib.md5(data).hexdigest())
    assert out.read_bytes() == data


def test_http_404_fails_fast_with_the_url(tmp_path, http_server):
    with pytest.raises(io.DownloadError, match=r"/nope\.bin: HTTP 404"):
        io.download(f"{http_server.url}/nope.bin", tmp_path / "x", progress=False)
    assert len(http_server.requests) == 1


def test_zip_extraction_refuses_escaping_members(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good/one.png", b"1")
        zf.writestr("two.png", b"2")
        zf.writestr("../evil.png", b"x")
        zf.writestr("/abs.png", b"y")
    out = tmp_path / "out"
    got = io.extract_zip_members(archive, out, ["two.png"])  # only what is asked for
    assert [p.name for p in got] == ["two.png"] and not (out / "good").exists()
    for bad in ("../evil.png", "/abs.png"):
        with pytest.raises(io.UnsafeArchiveError, match="outside|absolute"):
            io.extract_zip_members(archive, out, ["good/one.png", bad])
    assert not (tmp_path / "evil.png").exists() and not (out / "good").exists()  # checked before writing
    with pytest.raises(io.BitlabError, match="missing member"):
        io.extract_zip_members(archive, out, ["nope.png"])


def test_write_bytes_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "a.bin"
    io.write_bytes(target, b"old", fsync=False)  # creates the folder
    real_write = io.os.write

    def failing_write(fd, data):
        real_write(fd, bytes(data[:1]))
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        io.write_bytes(target, b"new contents")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]
    io.write_bytes(target, b"x" * 3_000_000)  # large writes loop until every byte is out
    assert target.stat().st_size == 3_000_000
