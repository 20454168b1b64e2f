"""Backgrounds: Openverse search and download against a real local HTTP server, user folders."""
from __future__ import annotations

import hashlib
import json

import cv2
import pytest

from bitlab.cli import main
from bitlab.errors import BitlabError
from bitlab.ooc import backgrounds
from bitlab.ooc.backgrounds import BackgroundsConfig, fetch
from bitlab.ooc.spec import BACKGROUND_FILE_COLUMNS, read_background_files, write_table


def _jpg(img, w, h) -> bytes:
    return cv2.imencode(".jpg", cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA))[1].tobytes()


def _textures():
    import skimage.data as data

    return [cv2.cvtColor(data.grass(), cv2.COLOR_GRAY2BGR), data.hubble_deep_field()[:, :, ::-1].copy(),
            cv2.cvtColor(data.brick(), cv2.COLOR_GRAY2BGR), data.astronaut()[:, :, ::-1].copy()]


def _serve_api(server, n_good: int = 4) -> dict:
    """An Openverse-shaped API answer: good results mixed with ones that must be passed over."""
    tex = _textures()
    results = []

    def result(rid, license, w=None, h=None, body=None, version="", **kw):
        url = server.add(f"files/{rid}.jpg", body if body is not None else _jpg(tex[len(results) % 4], 96, 80))
        r = {"id": rid, "title": f"title {rid}", "url": url, "creator": f"creator {rid}",
             "creator_url": f"https://example.org/u/{rid}", "foreign_landing_url": f"https://example.org/p/{rid}",
             "license": license, "license_version": version, "license_url": f"https://example.org/l/{license}",
             "provider": "flickr", "attribution": f'"title {rid}" by creator {rid} is licensed under {license}'}
        if w:
            r.update(width=w, height=h)
        results.append({**r, **kw})

    result("good-1", "by", 96, 80, version="2.0")
    result("no-mods", "by-nd", 96, 80)  # no modification allowed
    result("tiny-meta", "cc0", 50, 40)  # too small by its metadata: never downloaded
    result("broken", "by-sa", 96, 80, body=b"<html>not an image</html>")
    result("tiny-real", "pdm", body=_jpg(tex[0], 40, 30))  # no size in the answer; too small once fetched
    for k in range(2, n_good + 1):
        result(f"good-{k}", "cc0")
    api = server.add("ov/v1/images/", json.dumps({"result_count": len(results), "page": 1,
                                                   "results": results}).encode())
    return {"api": api, "results": results}


def _spec(tmp_path):
    write_table(tmp_path / "categories.csv", ["category", "search_terms"],
                [{"category": "grass", "search_terms": "grass lawn"},
                 {"category": "outer_space", "search_terms": "outer space stars"}])
    return tmp_path / "categories.csv"


def test_openverse_fetch(http_server, tmp_path):
    api = _serve_api(http_server)
    root = tmp_path / "bg"
    http_server.truncate["ov/v1/images/"] = 1  # a cut-off API answer is retried
    s = fetch(BackgroundsConfig(out=str(root), spec=str(_spec(tmp_path)), per_category=2, min_side=64,
                                api_url=api["api"]))
    assert s["counts"] == {"grass": 2, "outer_space": 2}
    rows = read_background_files(root / "backgrounds.csv")
    by_cat = {}
    for r in rows:
        by_cat.setdefault(r.category, []).append(r)
        assert (root / r.file).is_file() and hashlib.sha256((root / r.file).read_bytes()).hexdigest() == r.sha256
        assert r.author.startswith("creator ") and r.landing_url.startswith("https://example.org/p/")
        assert r.attribution and r.license_url and r.provider == "openverse:flickr" and r.search_terms
        assert (r.width, r.height) == (96, 80)
    # first come first served, and an image is never used by two categories
    assert [r.source_id for r in by_cat["grass"]] == ["good-1", "good-2"]
    assert sorted(r.source_id for r in by_cat["outer_space"]) == ["good-3", "good-4"]
    assert {r.license for r in rows} == {"by 2.0", "cc0"}
    requested = {p for _, p, _ in http_server.requests}
    assert [p for _, p, _ in http_server.requests].count("ov/v1/images/") == 3  # 2 categories + 1 retry
    assert "files/no-mods.jpg" not in requested and "files/tiny-meta.jpg" not in requested
    assert {"files/broken.jpg", "files/tiny-real.jpg"} <= requested
    assert not list(root.rglob("*broken*")) and not list(root.rglob("*tiny*"))  # rejects are not kept
    # resume: complete categories cost no request
    http_server.requests.clear()
    fetch(BackgroundsConfig(out=str(root), spec=str(_spec(tmp_path)), per_category=2, min_side=64,
                            api_url=api["api"]))
    assert http_server.requests == []


def test_openverse_too_few_is_a_clear_error(http_server, tmp_path):
    api = _serve_api(http_server, n_good=2)
    with pytest.raises(BitlabError, match=r"categories.csv line 3: category 'outer_space' has 0 usable image"):
        fetch(BackgroundsConfig(out=str(tmp_path / "bg"), spec=str(_spec(tmp_path)), per_category=2, min_side=64,
                                api_url=api["api"]))
    # the finished category was saved before the error
    assert {r.category for r in read_background_files(tmp_path / "bg" / "backgrounds.csv")} == {"grass"}


def test_user_folder_import_and_scan(tmp_path):
    src = tmp_path / "mine"
    tex = _textures()
    for cat, k in (("grass", 0), ("outer_space", 1)):
        (src / cat).mkdir(parents=True)
        cv2.imwrite(str(src / cat / f"{cat}_a.png"), cv2.resize(tex[k], (80, 70)))
    (src / "grass" / "zz_broken.jpg").write_bytes(b"nope")
    write_table(src / "backgrounds.csv", BACKGROUND_FILE_COLUMNS,
                [{"category": "grass", "file": "grass/grass_a.png", "uid": "my_grass", "license": "cc0",
                  "author": "me", "title": "my lawn"}])
    root = tmp_path / "bg"
    s = fetch(BackgroundsConfig(out=str(root), spec=str(_spec(tmp_path)), per_category=1, folder=str(src)))
    assert s["counts"] == {"grass": 1, "outer_space": 1}
    rows = {r.category: r for r in read_background_files(root / "backgrounds.csv")}
    assert rows["grass"].uid == "my_grass" and rows["grass"].license == "cc0" and rows["grass"].author == "me"
    assert rows["outer_space"].license == "unknown" and rows["outer_space"].provider == "user folder"
    # a file dropped into a category folder later is found, with licence 'unknown'
    cv2.imwrite(str(root / "grass" / "extra photo.jpg"), cv2.resize(tex[2], (64, 64)))
    found = {b.file: b for b in backgrounds.scan(root)}
    extra = found["grass/extra photo.jpg"]
    assert extra.license == "unknown" and extra.uid == "grass_extra-photo"
    with pytest.raises(BitlabError, match=r"mine/outer_space: no images for category 'outer_space'"):
        for p in (src / "outer_space").iterdir():
            p.unlink()
        fetch(BackgroundsConfig(out=str(tmp_path / "bg2"), spec=str(_spec(tmp_path)), per_category=1,
                                folder=str(src)))


def test_a_folder_gives_everything_it_holds_and_per_category_is_the_least(tmp_path, capsys):
    """A user with photos per category needs no --per-category: every image is imported (once: a
    rerun adds only what is new); --per-category N refuses a category folder with fewer than N."""
    src, tex = tmp_path / "mine", _textures()
    for cat, n in (("grass", 3), ("outer_space", 1)):
        (src / cat).mkdir(parents=True)
        for k in range(n):
            cv2.imwrite(str(src / cat / f"{k}.png"), cv2.resize(tex[k], (80 + k, 70)))
    out = tmp_path / "bg"
    args = ["backgrounds", "fetch", "--out", str(out), "--spec", str(_spec(tmp_path)), "--folder", str(src)]
    assert main(args) == 0 and "4 image(s) in 2 categories" in capsys.readouterr().out
    rows = read_background_files(out / "backgrounds.csv")
    assert sorted(r.category for r in rows) == ["grass", "grass", "grass", "outer_space"]
    assert main(args) == 0 and len(read_background_files(out / "backgrounds.csv")) == 4  # nothing twice
    cv2.imwrite(str(src / "grass" / "new.png"), cv2.resize(tex[3], (64, 64)))
    assert main(args) == 0 and "5 image(s) in 2 categories" in capsys.readouterr().out
    assert main([*args[:3], str(tmp_path / "bg2"), *args[4:], "--per-category", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{src / 'outer_space'}: 1 image file(s) for category 'outer_space', need 2; nothing was imported" in err
    assert not (tmp_path / "bg2").exists()


def test_a_folder_file_that_does_not_decode_is_skipped_and_named(tmp_path, capsys):
    """A photo folder with one bad file (a PNG header declaring 40000 x 40000 px, a truncated JPEG)
    imports the rest and names each skipped file with its reason; a category left with nothing is
    an error naming its folder."""
    import struct
    import zlib

    src, tex = tmp_path / "mine", _textures()
    for cat in ("grass", "outer_space"):
        (src / cat).mkdir(parents=True)
        cv2.imwrite(str(src / cat / "good.png"), cv2.resize(tex[0], (80, 70)))
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    huge = src / "grass" / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)))
    cut = src / "outer_space" / "cut.jpg"
    cut.write_bytes(_jpg(tex[1], 96, 80)[:200])
    out = tmp_path / "bg"
    args = ["backgrounds", "fetch", "--out", str(out), "--spec", str(_spec(tmp_path)), "--folder", str(src)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 image(s) in 2 categories" in printed
    assert f"skipped, does not decode: {huge}" in printed and f"skipped, does not decode: {cut}" in printed
    assert sorted(r.file for r in read_background_files(out / "backgrounds.csv")) == \
        ["grass/grass_good.png", "outer_space/outer_space_good.png"]
    (src / "outer_space" / "good.png").unlink()
    assert main([*args[:3], str(tmp_path / "bg2"), *args[4:]]) == 2
    err = capsys.readouterr().err
    assert "category 'outer_space' has 0 usable image(s)" in err and str(src) in err


def test_cli(http_server, tmp_path, capsys):
    api = _serve_api(http_server)
    rc = main(["backgrounds", "fetch", "--out", str(tmp_path / "bg"), "--spec", str(_spec(tmp_path)),
               "--per-category", "1", "--min-side", "64", "--api-url", api["api"], "--categories", "grass"])
    assert rc == 0 and "1 image(s) in 1 categories" in capsys.readouterr().out
    rc = main(["backgrounds", "fetch", "--out", str(tmp_path / "bg"), "--spec", str(_spec(tmp_path)),
               "--categories", "kitchen", "--api-url", api["api"]])
    assert rc == 2 and "no category kitchen" in capsys.readouterr().err


def _result(rid: str, url: str) -> dict:
    return {"id": rid, "url": url, "license": "cc0", "title": rid, "creator": "c", "provider": "flickr"}


def test_search_results_never_reach_local_files_or_fill_the_disk(http_server, tmp_path, capsys, caplog):
    tex = _textures()
    private = tmp_path / "private" / "holiday.jpg"
    private.parent.mkdir()
    private.write_bytes(_jpg(tex[3], 96, 80))  # a real photo: base bitlab imported it as CC0
    http_server.redirect["moved.jpg"] = private.as_uri()
    http_server.stream["zero.jpg"] = 64 << 20  # an endless body, cut at --max-download
    http_server.add("big.jpg", bytes(2 << 20))  # announces more than --max-download
    good = http_server.add("good.jpg", _jpg(tex[0], 96, 80))
    answer = [_result("local", private.as_uri()), _result("moved", f"{http_server.url}/moved.jpg"),
              _result("zero", f"{http_server.url}/zero.jpg"), _result("big", f"{http_server.url}/big.jpg"),
              _result("devzero", "file:///dev/zero"), _result("good", good)]
    api = http_server.add("ov/", json.dumps({"results": answer}).encode())
    out = tmp_path / "bg"
    rc = main(["backgrounds", "fetch", "--out", str(out), "--spec", str(_spec(tmp_path)), "--categories", "grass",
               "--per-category", "1", "--min-side", "64", "--api-url", api, "--max-download", "1M"])
    assert rc == 0, capsys.readouterr().err
    rows = read_background_files(out / "backgrounds.csv")
    assert [r.source_id for r in rows] == ["good"]
    assert [p.name for p in (out / "grass").iterdir()] == [rows[0].file.split("/")[1]]
    assert private.read_bytes() not in {p.read_bytes() for p in out.rglob("*.jpg")}
    for why in ("only http:// and https:// URLs are fetched, not file://", "redirects to file://",
                "more than the download limit of 1048576 bytes", "announces 2097152 bytes"):
        assert why in caplog.text, why
    # the API itself must be http(s), and answers are capped too
    rc = main(["backgrounds", "fetch", "--out", str(tmp_path / "bg2"), "--spec", str(_spec(tmp_path)),
               "--api-url", (tmp_path / "answer.json").as_uri()])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --api-url file://" in err and "only http:// and https://" in err
    assert not (tmp_path / "bg2").exists()


def test_a_folder_short_of_a_later_category_imports_nothing(tmp_path, capsys):
    src = tmp_path / "mine"
    (src / "grass").mkdir(parents=True)
    cv2.imwrite(str(src / "grass" / "a.png"), cv2.resize(_textures()[0], (80, 70)))
    (src / "outer_space").mkdir()  # nothing in it
    out = tmp_path / "bg"
    rc = main(["backgrounds", "fetch", "--out", str(out), "--spec", str(_spec(tmp_path)), "--per-category", "1",
               "--folder", str(src)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{src / 'outer_space'}: no images for category 'outer_space'" in err and "nothing was imported" in err
    assert not out.exists()


def test_a_category_left_short_is_named_and_the_later_ones_are_still_fetched(tmp_path, capsys):
    src = tmp_path / "mine"
    tex = _textures()
    write_table(tmp_path / "three.csv", ["category", "search_terms"],
                [{"category": c, "search_terms": c} for c in ("grass", "outer_space", "brick")])
    for cat in ("grass", "brick"):
        (src / cat).mkdir(parents=True)
        cv2.imwrite(str(src / cat / "a.png"), cv2.resize(tex[0], (80, 70)))
    (src / "outer_space").mkdir()
    (src / "outer_space" / "a.jpg").write_bytes(b"not a jpeg")  # counted, then fails to decode
    out = tmp_path / "bg"
    rc = main(["backgrounds", "fetch", "--out", str(out), "--spec", str(tmp_path / "three.csv"),
               "--per-category", "1", "--folder", str(src)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "three.csv line 3: category 'outer_space' has 0 usable image(s)" in err
    assert f"{out / 'backgrounds.csv'} lists the 2 image(s) fetched so far (2 of 3 categories complete)" in err
    assert sorted(r.category for r in read_background_files(out / "backgrounds.csv")) == ["brick", "grass"]
    assert not (out / "fetch.json").exists()
