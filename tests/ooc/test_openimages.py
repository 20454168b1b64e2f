"""OpenImages readers, annotation filters, and the fetcher against a real local HTTP server."""
from __future__ import annotations

import hashlib
import re
import shutil
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

from bitlab import fileio
from bitlab.cli import main
from bitlab.errors import BitlabError
from bitlab.ooc import openimages
from bitlab.ooc.openimages import AnnotationFilter, FetchConfig, Tree, fetch
from bitlab.ooc.select import PlanConfig, plan
from bitlab.ooc.spec import SpecError, load_classes

SEG = "v5/validation-annotations-object-segmentation.csv"


def serve(server, tree_root: Path, *, extra_members: dict[str, dict[str, bytes]] | None = None,
          drop: set[str] = frozenset(),
          unrelated_zip: bool = True) -> dict:
    """Publish a local OpenImages tree the way upstream does: CSVs at their upstream paths,
    masks in zips sharded by the first hex digit, JPEGs under <images>/validation/."""
    tree = Tree(tree_root, "validation")
    for pattern, local in tree.csv_files().items():
        server.add(f"oi/{openimages.remote_path(pattern, 'validation')}", local.read_bytes(), goog_md5=True)
    shards: dict[str, dict[str, bytes]] = defaultdict(dict)
    for m in sorted(tree.masks_dir.iterdir()):
        members = shards[m.name[0]]  # the shard exists even if its only member is dropped
        if m.name not in drop:
            members[m.name] = m.read_bytes()
    for char, members in (extra_members or {}).items():  # shard char -> {member name: bytes}
        shards[char].update(members)
    if unrelated_zip:  # a shard that no selected mask needs: must never be requested
        shards[next(c for c in "0123456789abcdef" if c not in shards)]["zz_unrelated.png"] = b"png"
    zips = {}
    for char, members in shards.items():
        path = tree_root.parent / f"validation-masks-{char}.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        zips[char] = server.add(f"oi/v5/validation-masks/validation-masks-{char}.zip", path.read_bytes(),
                                goog_md5=True)
    for jpg in sorted((tree_root / "validation").glob("*.jpg")):
        server.add(f"img/validation/{jpg.name}", jpg.read_bytes())
    return {"base_url": f"{server.url}/oi", "images_url": f"{server.url}/img", "zips": zips}


def _fetch_cfg(inp, urls, out, **kw) -> FetchConfig:
    base = dict(out=str(out), classes=str(inp["classes"]), max_per_class=2, base_url=urls["base_url"],
                images_url=urls["images_url"], pins={}, filters=AnnotationFilter(min_predicted_iou=0.5))
    return FetchConfig(**{**base, **kw})


def _requested(server, prefix: str) -> list[str]:
    return [p for _, p, _ in server.requests if p.startswith(prefix)]


def test_fetch_only_what_is_needed_then_plan(small_inputs, http_server, tmp_path):
    urls = serve(http_server, small_inputs["openimages"])
    out = tmp_path / "tree"
    summary = fetch(_fetch_cfg(small_inputs, urls, out))
    assert summary["instances"] == 4  # 2 per class, of the 3 clean ones each
    tree = Tree(out, "validation")
    masks = sorted(p.name for p in tree.masks_dir.iterdir())
    assert len(masks) == 4
    images = sorted(p.stem for p in (out / "validation").iterdir())
    assert sorted(p.split("/")[-1][:-4] for p in _requested(http_server, "img/")) == images
    assert {m.split("_")[0] for m in masks} == set(images)
    needed_zips = {f"oi/v5/validation-masks/validation-masks-{m[0]}.zip" for m in masks}
    assert set(_requested(http_server, "oi/v5/validation-masks/")) == needed_zips  # not the others
    for f in tree.csv_files().values():
        assert f.read_bytes() == (small_inputs["openimages"] / f.name).read_bytes()
    # masks came out of the zips bit-exact, at their own (different) resolution
    for m in masks:
        assert (tree.mask(m)).read_bytes() == (small_inputs["openimages"] / "validation-masks" / m).read_bytes()
    # the fetched tree is enough to plan from
    sel, _ = plan(PlanConfig(out=str(tmp_path / "sel.csv"), openimages=str(out),
                             backgrounds=str(small_inputs["backgrounds"]), classes=str(small_inputs["classes"]),
                             background_categories=str(small_inputs["categories"]),
                             filters=AnnotationFilter(min_predicted_iou=0.5), min_object_px=40, min_background_px=32))
    assert {f.image_id for f in sel.foregrounds} == set(images)

    # a second fetch resumes: everything is there, nothing is requested
    http_server.requests.clear()
    fetch(_fetch_cfg(small_inputs, urls, out))
    assert http_server.requests == []
    # a lost mask: only its zip comes back
    tree.mask(masks[0]).unlink()
    (out / "downloads" / f"validation-masks-{masks[0][0]}.zip").unlink()
    fetch(_fetch_cfg(small_inputs, urls, out))
    assert [p for _, p, _ in http_server.requests] == [f"oi/v5/validation-masks/validation-masks-{masks[0][0]}.zip"]


def test_pinned_checksum_retries_then_fails_clearly(small_inputs, http_server, tmp_path):
    urls = serve(http_server, small_inputs["openimages"])
    seg = small_inputs["openimages"] / "validation-annotations-object-segmentation.csv"
    pins = {SEG: hashlib.md5(seg.read_bytes()).hexdigest()}
    path = f"oi/{SEG}"
    http_server.corrupt[path] = 1  # one bad transfer: retried, then fine
    fetch(_fetch_cfg(small_inputs, urls, tmp_path / "a", pins=pins))
    assert _requested(http_server, path) == [path, path]
    http_server.requests.clear()
    http_server.corrupt[path] = 10  # always bad
    with pytest.raises(fileio.DownloadError) as e:
        fetch(_fetch_cfg(small_inputs, urls, tmp_path / "b", pins=pins, retries=3))
    assert "gave up after 3 attempts" in str(e.value) and "md5 mismatch" in str(e.value)
    assert "pinned md5" in str(e.value) and "--no-pins" in str(e.value)
    assert len(_requested(http_server, path)) == 3
    assert not (tmp_path / "b" / seg.name).exists()


def test_corrupt_zip_and_jpeg_are_retried(small_inputs, http_server, tmp_path):
    urls = serve(http_server, small_inputs["openimages"])
    for p in list(http_server.headers):  # every zip once corrupted; the server's md5 catches it
        if p.endswith(".zip"):
            http_server.corrupt[p] = 1
    for jpg in (small_inputs["openimages"] / "validation").glob("*.jpg"):  # JPEGs carry no checksum:
        http_server.corrupt[f"img/validation/{jpg.name}"] = 1  # a flipped first byte fails to decode
    fetch(_fetch_cfg(small_inputs, urls, tmp_path / "t"))
    for p in set(_requested(http_server, "oi/v5/validation-masks/")) | set(_requested(http_server, "img/")):
        assert _requested(http_server, p) == [p, p]
    tree = Tree(tmp_path / "t", "validation")
    for jpg in (tmp_path / "t" / "validation").iterdir():
        assert jpg.read_bytes() == (small_inputs["openimages"] / "validation" / jpg.name).read_bytes()
    assert len(list(tree.masks_dir.iterdir())) == 4


def test_escaping_archive_member_is_refused(small_inputs, http_server, tmp_path):
    good = next(i for i in small_inputs["instances"] if not i.flags and i.rotation == "0.0" and i.iou == "0.9"
                and i.box_row)
    urls = serve(http_server, small_inputs["openimages"], extra_members={good.mask_path[0]: {"../../evil.png": b"x"}})
    cfg = _fetch_cfg(small_inputs, urls, tmp_path / "t", max_per_class=3)  # all 3 clean masks per class
    with pytest.raises(fileio.UnsafeArchiveError, match=r"validation-masks-.\.zip: .*'\.\./\.\./evil\.png'.*refusing"):
        fetch(cfg)
    assert not list(tmp_path.rglob("evil.png"))
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    assert not (tmp_path / "t" / "validation-masks" / good.mask_path).exists()  # nothing from that archive


def test_missing_member_and_unsafe_csv_paths(small_inputs, http_server, tmp_path):
    gone = next(i for i in small_inputs["instances"] if not i.flags and i.rotation == "0.0" and i.iou == "0.9"
                and i.box_row).mask_path
    urls = serve(http_server, small_inputs["openimages"], drop={gone})
    with pytest.raises(BitlabError, match=rf"validation-masks-{gone[0]}.zip: does not contain {gone}"):
        fetch(_fetch_cfg(small_inputs, urls, tmp_path / "t", max_per_class=3))
    seg = small_inputs["openimages"] / "validation-annotations-object-segmentation.csv"
    seg.write_text(seg.read_text().replace(gone, "../" + gone, 1))
    with pytest.raises(SpecError, match=r"line \d+: field 'MaskPath' must be a bare .png file name"):
        openimages.read_segmentations(seg, {"/m/01yrx", "/m/02p5f1q"})


def test_fetch_a_committed_selection(small_inputs, http_server, tmp_path):
    """With --selection the fetch gets exactly the pinned files, and notices when upstream changed."""
    sel = tmp_path / "sel.csv"
    plan(PlanConfig(out=str(sel), openimages=str(small_inputs["openimages"]),
                    backgrounds=str(small_inputs["backgrounds"]), classes=str(small_inputs["classes"]),
                    background_categories=str(small_inputs["categories"]),
                    filters=AnnotationFilter(min_predicted_iou=0.5),
                    min_object_px=40, min_background_px=32))
    urls = serve(http_server, small_inputs["openimages"])
    fetch(_fetch_cfg(small_inputs, urls, tmp_path / "a", selection=str(sel)))
    from bitlab.ooc.spec import load_selection

    want = {f.image_id for f in load_selection(sel).foregrounds}
    assert {p.stem for p in (tmp_path / "a" / "validation").iterdir()} == want
    # the selection already names the instances: only the images CSV (licences) is fetched
    assert sorted(p for p in _requested(http_server, "oi/") if p.endswith(".csv")) == [
        "oi/" + openimages.remote_path("{split}-images-with-rotation.csv", "validation")]
    # a mask edited on disk is a local problem, not upstream's: the fetch restores it
    mask = next((tmp_path / "a" / "validation-masks").iterdir())
    good = mask.read_bytes()
    shutil.copyfile(next(p for p in (tmp_path / "a" / "validation-masks").iterdir() if p != mask), mask)
    fetch(_fetch_cfg(small_inputs, urls, tmp_path / "a", selection=str(sel)))
    assert mask.read_bytes() == good
    # upstream re-encodes one JPEG: the pinned sha256 no longer matches
    victim = sorted(want)[0]
    shutil.copyfile(small_inputs["openimages"] / "validation" / f"{sorted(want)[1]}.jpg",
                    http_server.root / "img" / "validation" / f"{victim}.jpg")
    with pytest.raises(fileio.DownloadError, match=rf"{victim}.jpg: gave up after 3 attempts: sha256 mismatch"):
        fetch(_fetch_cfg(small_inputs, urls, tmp_path / "b", selection=str(sel)))


@pytest.mark.parametrize("change, message", [
    ({"split": "bogus"}, "split must be one of train, validation, test, got 'bogus'"),
    ({"max_per_class": -1}, "max_per_class must be at least 1, got -1"),
    ({"classes": "nope.csv"}, "nope.csv: no such file"),
    ({"selection": "nope.csv"}, "nope.csv: no such file"),
    ({"base_url": "file:///srv/oi"}, "base_url file:///srv/oi: only http:// and https:// URLs are fetched"),
    ({"images_url": "ftp://mirror/img"}, "images_url ftp://mirror/img: only http:// and https:// URLs"),
])
def test_fetch_checks_local_inputs_before_any_download(small_inputs, http_server, tmp_path, change, message):
    cfg = _fetch_cfg(small_inputs, {"base_url": f"{http_server.url}/oi", "images_url": f"{http_server.url}/img"},
                     tmp_path / "tree")
    cfg = FetchConfig(**{**cfg.__dict__, **change})
    with pytest.raises(BitlabError, match=re.escape(message)):
        fetch(cfg)
    assert http_server.requests == [] and not (tmp_path / "tree").exists()


def test_readers_and_filters(small_inputs, tmp_path):
    names = openimages.read_class_descriptions(small_inputs["openimages"] / "class-descriptions-boxable.csv")
    assert names["/m/01yrx"] == "Cat"
    with_header = tmp_path / "cd.csv"
    with_header.write_text("label,class\n/m/01yrx,Cat\n")
    assert openimages.read_class_descriptions(with_header) == {"/m/01yrx": "Cat"}
    with_header.write_text("/m/01yrx,Cat,extra\n")
    with pytest.raises(SpecError, match="line 1: expected 'MID,DisplayName'"):
        openimages.read_class_descriptions(with_header)
    tree = Tree(small_inputs["openimages"], "validation")
    classes = load_classes(small_inputs["classes"])
    pool, funnel = openimages.annotated_candidates(tree, classes, AnnotationFilter(min_predicted_iou=0.5))
    assert funnel["cat"] == {"masks": 11, "predicted_iou": 9, "box_size": 9, "box_flags": 5, "rotation": 3}
    loose = AnnotationFilter(min_predicted_iou=0, allow_group_of=True, allow_depiction=True, allow_truncated=True,
                             require_box_match=False)
    pool, funnel = openimages.annotated_candidates(tree, classes, loose)
    assert funnel["cat"]["box_flags"] == 11 and funnel["cat"]["rotation"] == 9  # 90/270 and nan stay out
    bad = tmp_path / "seg.csv"
    bad.write_text("MaskPath,ImageID\n")
    with pytest.raises(SpecError, match="missing column"):
        openimages.read_segmentations(bad, {"/m/01yrx"})


def test_cli_fetch(small_inputs, http_server, tmp_path, capsys):
    urls = serve(http_server, small_inputs["openimages"])
    rc = main(["openimages", "fetch", str(tmp_path / "t"), "--classes", str(small_inputs["classes"]),
               "--base-url", urls["base_url"], "--images-url", urls["images_url"], "--no-pins",
               "--max-per-class", "1", "--min-iou", "0.5"])
    assert rc == 0 and "2 instance(s)" in capsys.readouterr().out
    rc = main(["openimages", "fetch", str(tmp_path / "t"), "--classes", str(small_inputs["classes"]),
               "--base-url", f"{http_server.url}/nothing-here", "--no-pins", "--split", "test"])
    assert rc == 2 and "HTTP 404" in capsys.readouterr().err


def test_cli_fetch_caps_each_download(small_inputs, http_server, tmp_path, capsys):
    urls = serve(http_server, small_inputs["openimages"])
    rc = main(["openimages", "fetch", str(tmp_path / "t"), "--classes", str(small_inputs["classes"]),
               "--base-url", urls["base_url"], "--images-url", urls["images_url"], "--no-pins",
               "--max-download", "1K"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert re.search(r"error: http://127\.0\.0\.1:\d+/oi/\S+\.csv: announces \d+ bytes, more than the download "
                     r"limit of 1024 bytes \(raise it with --max-download\)", err)
    left = [p for p in (tmp_path / "t").rglob("*") if p.is_file()]
    assert left and all(p.stat().st_size <= 1024 and not p.name.endswith(".part") for p in left)
