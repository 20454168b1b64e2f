"""`bitlab make-ooc`: the 3321-image acceptance build, resume, exact reruns, bad inputs, the demo."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from bitlab.cli import main
from bitlab.errors import BitlabError
from bitlab.ooc import build, compose
from bitlab.eval.robustness import load_eval_set
from bitlab.ooc.build import MakeOOCConfig, build_demo
from bitlab.ooc.record import check_complete
from bitlab.ooc.spec import load_background_categories, load_classes
from bitlab.paths import SAMPLE_DIR
from tests.fixtures.processes import ENV


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_build(full_inputs, tmp_path_factory):
    """Plan and build the acceptance set through the CLI, at a small --size to stay quick."""
    inp = full_inputs
    work = tmp_path_factory.mktemp("full_build")
    sel = work / "selection.csv"
    assert main(["make-ooc", "plan", "--out", str(sel), "--openimages", str(inp["openimages"]),
                 "--backgrounds", str(inp["backgrounds"]), "--classes", str(inp["classes"]),
                 "--background-categories", str(inp["categories"]), "--min-iou", "0.5", "--min-object-px", "40",
                 "--min-background-px", "32"]) == 0
    out = work / "out"
    argv = ["make-ooc", "--openimages", str(inp["openimages"]), "--backgrounds", str(inp["backgrounds"]),
            "--selection", str(sel), "--classes", str(inp["classes"]), "--size", "32", "--workers", "2",
            "--out", str(out)]
    assert main(argv) == 0
    return {"out": out, "argv": argv, "selection": sel, **inp}


def test_acceptance_3321_images(full_build, capsys):
    out = full_build["out"]
    pngs = sorted(out.glob("*/*.png"))
    assert len(pngs) == 81 * 41 == 3321
    rows = _manifest(out)
    assert len(rows) == 3321
    classes = load_classes(full_build["classes"])
    assert {p.parent.name for p in pngs} == {c.folder for c in classes}  # folders as classes.csv names them
    per_class = {c.folder: sum(r["class"] == c.folder for r in rows) for c in classes}
    assert per_class == {c.folder: c.n_foregrounds * 41 for c in classes}
    by_folder = {c.folder: c for c in classes}
    usual = {(c.category, f) for c in load_background_categories(full_build["categories"]) for f in c.usual_for}
    assert len(usual) == 26
    assert {(r["bg_category"], r["class"]) for r in rows if r["usual_context"] == "true"} == usual
    n_usual = sum(by_folder[f].n_foregrounds for _, f in usual)  # one image per foreground of the class
    assert sum(r["usual_context"] == "true" for r in rows) == n_usual
    for r in rows[:: 97]:
        c = by_folder[r["class"]]
        assert r["ilsvrc_indices"] == ";".join(map(str, c.ilsvrc_indices))
        assert r["ilsvrc_wnids"] == ";".join(c.ilsvrc_wnids)
        assert hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() == r["sha256"]
        img = cv2.imread(str(out / r["file"]))
        assert img.shape == (32, 32, 3) and compose.pixel_sha256(img) == r["pixel_sha256"]
        assert r["fg_license"] and r["bg_license"] == "cc0" and r["modified"] == "true"
        assert r["annotations_license"] == "CC BY 4.0 (Google, Open Images)"  # Open Images' masks
        cat, k = r["bg_uid"].rsplit("_", 1)
        assert (r["bg_provider"], r["bg_source_id"]) == ("test", f"id-{cat}-{k}")
        assert r["bg_attribution"] == f'"{cat} {k}" by a | b is marked with CC0 1.0'  # the source's credit line
    # the filtered-out instances (group-of, rotated) never appear
    used = {r["fg_image_id"] for r in rows}
    bad = {i.image_id for i in full_build["instances"] if i.flags or i.rotation != "0.0"}
    assert len(used) == 81 and not used & bad
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"] == {"images": 3321, "classes": 20, "foregrounds": 81, "backgrounds": 41}
    assert meta["manifest_sha256"] == hashlib.sha256((out / "manifest.csv").read_bytes()).hexdigest()
    assert meta["inputs"]["selection"]["sha256"] == hashlib.sha256(full_build["selection"].read_bytes()).hexdigest()
    assert meta["command"] == ["bitlab", *full_build["argv"]]  # the command line as given
    assert meta["selection_seed"] == 0 and meta["config"]["size"] == 32 and meta["config"]["png"] == "fast"
    assert {"python", "numpy", "opencv", "isal", "encoding"} <= set(meta["versions"])
    assert load_classes(out / "classes.csv") == classes  # the output describes itself
    attribution = (out / "ATTRIBUTION.md").read_text()
    assert sum(line.startswith("| ") for line in attribution.splitlines()) == 2 + 81 + 41  # 2 headers
    assert "CC BY 4.0" in attribution and "a \\| b" in attribution  # '|' escaped inside tables
    assert '| test id-grass-0 | "grass 0" by a \\| b is marked with CC0 1.0 |' in attribution


def test_second_run_is_byte_identical_and_skips(full_build, capsys):
    out = full_build["out"]
    before = _tree_digest(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")}
    capsys.readouterr()
    assert main(full_build["argv"]) == 0
    assert "built 0, kept 3321" in capsys.readouterr().out
    assert _tree_digest(out) == before
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # untouched, not rewritten


def test_killed_run_resumes_to_the_same_bytes(full_build, tmp_path, capsys):
    """SIGKILL a real `bitlab make-ooc` process part-way; the next run finishes the job and the
    result is byte-identical to an uninterrupted build."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    argv = [a if a != str(full_build["out"]) else str(out) for a in full_build["argv"]]
    env = {**os.environ, "PYTHONPATH": str(Path(build.__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "bitlab", *argv, "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / build.JOURNAL
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 300:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.csv").exists()
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "built 3321" not in printed and "kept 0 " not in printed  # it resumed
    got, reference = _tree_digest(out), _tree_digest(full_build["out"])
    for name in ("dataset.json", "config.json"):  # they name the output folder, which differs here
        got.pop(name), reference.pop(name)
    assert got == reference


def test_resume_after_interruption(full_build, tmp_path, capsys):
    """A run that died part-way: some images missing, one half-written temp file, one damaged
    image, a torn journal line. The next run rebuilds exactly those and ends byte-identical."""
    src = full_build["out"]
    reference = _tree_digest(src)
    out = tmp_path / "out"
    out.mkdir()
    for rel in reference:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes((src / rel).read_bytes())
    for name in ("manifest.csv", "dataset.json", "ATTRIBUTION.md", "config.json", "classes.csv"):
        (out / name).unlink()  # the run died before writing them
    pngs = sorted(out.glob("*/*.png"))
    for p in pngs[:50]:
        p.unlink()
    pngs[60].write_bytes(b"damaged")
    (pngs[61].parent / f".{pngs[61].name}.abc.tmp").write_bytes(b"partial")
    journal = out / build.JOURNAL
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # torn last line
    argv = [a if a != str(src) else str(out) for a in full_build["argv"]]
    capsys.readouterr()
    assert main(argv) == 0
    assert "built 52, kept 3269" in capsys.readouterr().out  # 50 missing + damaged + torn line
    got = _tree_digest(out)
    for name in ("dataset.json", "config.json"):  # they name the output folder, which differs here
        got.pop(name), reference.pop(name)
    assert got == reference
    assert not list(out.glob("*/.*.tmp"))


# ----------------------------------------------------------------------------- one writer per folder
def _bitlab(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bitlab", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_two_builds_started_together_into_one_folder(full_build, tmp_path):
    """Two real `bitlab make-ooc` processes started together: exactly one builds (exit 0), the other
    exits 2 naming its pid, without a traceback; the folder is the one build's, whole."""
    out = tmp_path / "out"
    argv = [a if a != str(full_build["out"]) else str(out) for a in full_build["argv"]]
    procs = [_bitlab([*argv, "--workers", "1"]) for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], errs
    winner = next(p for p in procs if p.returncode == 0)
    err = errs[1 - procs.index(winner)]
    assert f"bitlab make-ooc: error: {out} is in use by pid {winner.pid} on " in err and "Traceback" not in err
    got, reference = _tree_digest(out), _tree_digest(full_build["out"])
    for name in ("dataset.json", "config.json"):  # they name the output folder, which differs here
        got.pop(name), reference.pop(name)
    assert got == reference
    check_complete(out)


def test_killed_rebuild_with_other_settings_is_refused_by_readers_until_finished(full_build, tmp_path, capsys):
    """A finished --size 32 folder rebuilt at --size 48 and SIGKILLed midway: no record describes the
    mix of sizes (dataset.json, manifest.csv, config.json are gone first), `evaluate` refuses the
    folder naming it, and a rerun leaves a folder whose record and images agree."""
    out = tmp_path / "out"
    shutil.copytree(full_build["out"], out)
    argv = [a if a != str(full_build["out"]) else str(out) for a in full_build["argv"]]
    argv[argv.index("--size") + 1] = "48"
    journal = out / build.JOURNAL
    before = journal.read_text().count("\n")
    proc = _bitlab([*argv, "--workers", "1"])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.read_text().count("\n") >= before + 300:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the rebuild finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sizes = {cv2.imread(str(p)).shape[0] for p in list(out.glob("*/*.png"))[::50]}
    assert sizes == {32, 48}  # a mix on disk...
    assert not any((out / name).exists() for name in ("dataset.json", "manifest.csv", "config.json"))  # ...unrecorded
    with pytest.raises(BitlabError, match=r"out: an unfinished make-ooc build"):
        load_eval_set(out)
    capsys.readouterr()
    assert main(["evaluate", "--model", "R14x0.5", "--random-init", "--data", str(out), "--out", str(tmp_path / "r")]) == 2
    assert "out: an unfinished make-ooc build" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(argv) == 0
    check_complete(out)
    assert {cv2.imread(str(out / r["file"])).shape[0] for r in _manifest(out)[::97]} == {48}
    assert json.loads((out / "dataset.json").read_text())["config"]["size"] == 48


# ----------------------------------------------------------------------------- bad inputs
@pytest.fixture
def small_cfg(plan_small, tmp_path):
    inp, sel = plan_small
    return MakeOOCConfig(out=str(tmp_path / "out"), openimages=str(inp["openimages"]),
                         backgrounds=str(inp["backgrounds"]), selection=str(sel), classes=str(inp["classes"]),
                         background_categories=str(inp["categories"]), size=48, workers=2)


def test_each_foreground_keeps_its_own_mask_licence(small_cfg):
    """A tree whose images table names its masks' licence (`AnnotationsLicense`, as the embedded
    sample's does) gets it in the manifest and ATTRIBUTION.md; the others keep Open Images'."""
    images = Path(small_cfg.openimages) / "validation-images-with-rotation.csv"
    with images.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cats = {r["image_id"] for r in _selection_rows(small_cfg) if r["kind"] == "foreground" and r["group"] == "cat"}
    for r in rows:
        r["AnnotationsLicense"] = "GPL-2 (the photo's alpha channel)" if r["ImageID"] in cats else ""
    with images.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = Path(small_cfg.out)
    build.build(small_cfg)
    got = {(r["class"], r["annotations_license"]) for r in _manifest(out)}
    assert got == {("cat", "GPL-2 (the photo's alpha channel)"), ("coffee_cup", "CC BY 4.0 (Google, Open Images)")}
    attribution = (out / "ATTRIBUTION.md").read_text()
    assert "Segmentation masks and annotations: each foreground's own licence" in attribution
    assert "Open Images, CC BY 4.0." not in attribution  # the one-line claim would be wrong for the cats
    cat_rows = [line for line in attribution.splitlines() if line.startswith("| cat |")]
    assert len(cat_rows) == 2 and all("| GPL-2 (the photo's alpha channel) |" in line for line in cat_rows)


def _selection_rows(cfg) -> list[dict]:
    with open(cfg.selection, newline="") as f:
        return list(csv.DictReader(f))


def test_small_build_and_geometry_on_real_pixels(small_cfg):
    s = build.build(small_cfg)
    assert s["images"] == 4 * 4 and s["composed"] == 16
    out = Path(small_cfg.out)
    for r in _manifest(out):
        img = cv2.imread(str(out / r["file"]))
        bg = compose.decode(Path(small_cfg.backgrounds) / r["bg_file"])  # 64 x 48: the crop is 48 px
        side = min(bg.shape[:2])
        expected = cv2.resize(bg[:side, :side], (48, 48), interpolation=cv2.INTER_AREA)
        changed = np.any(img != expected, axis=2)
        x0, y0, x1, y1 = compose.tight_box(changed)
        assert abs(max(x1 - x0, y1 - y0) - round(0.8 * 48)) <= 1
        assert r["bg_crop"] == f"0,0,{side}" and r["size"] == "48"
        bx = [int(v) for v in r["fg_bbox_out"].split(",")]
        assert abs(bx[0] - x0) <= 1 and abs(bx[2] - x1) <= 1 and abs(bx[1] - y0) <= 1 and abs(bx[3] - y1) <= 1
        # categories.csv: grass is a usual context for cats (usual_for), space for nothing
        assert r["usual_context"] == str(r["class"] == "cat" and r["bg_category"] == "grass").lower()


def test_background_category_missing_from_the_table_is_named(small_cfg, tmp_path):
    table = tmp_path / "only_grass.csv"
    table.write_text("category,search_terms\ngrass,grass\n")
    with pytest.raises(BitlabError, match=r"line \d+ \(space_0\): background category 'space' is not in .*only_grass"):
        build.build(MakeOOCConfig(**{**small_cfg.__dict__, "background_categories": str(table)}))
    assert not Path(small_cfg.out).exists()


def test_corrupt_input_stops_before_writing(small_cfg):
    rows = _selection_rows(small_cfg)
    fg = rows[0]
    jpg = Path(small_cfg.openimages) / "validation" / f"{fg['image_id']}.jpg"
    jpg.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(BitlabError) as e:
        build.build(small_cfg)
    assert "selection.csv line 2" in str(e.value) and "does not match the selection's sha256" in str(e.value)
    assert "nothing was written" in str(e.value)
    assert not Path(small_cfg.out).exists()


def test_undecodable_input_with_matching_checksum(small_cfg):
    """A selection edited by hand to pin a broken file: caught when decoding, still before writing."""
    sel = Path(small_cfg.selection)
    rows = _selection_rows(small_cfg)
    bg = next(r for r in rows if r["kind"] == "background")
    path = Path(small_cfg.backgrounds) / bg["file"]
    path.write_bytes(b"not a png at all")
    text = sel.read_text().replace(bg["sha256"], hashlib.sha256(path.read_bytes()).hexdigest())
    sel.write_text(text)
    with pytest.raises(BitlabError, match=rf"line \d+ \({bg['uid']}\): .*cannot decode image"):
        build.build(small_cfg)
    assert not Path(small_cfg.out).exists()
    s = build.build(MakeOOCConfig(**{**small_cfg.__dict__, "skip_bad": True}))
    assert s["images"] == 4 * 3 and len(s["skipped"]) == 1 and bg["uid"] in s["skipped"][0]
    meta = json.loads((Path(small_cfg.out) / "dataset.json").read_text())
    assert meta["skipped"] == s["skipped"]


def test_huge_declared_background_is_named_and_skippable(small_cfg, capsys):
    """A background whose header declares 40000 x 40000 px: a clear error, also under --skip-bad."""
    from tests.fixtures.images import png_declaring

    sel = Path(small_cfg.selection)
    bg = next(r for r in _selection_rows(small_cfg) if r["kind"] == "background")
    path = Path(small_cfg.backgrounds) / bg["file"]
    path.write_bytes(png_declaring(40000, 40000))
    sel.write_text(sel.read_text().replace(bg["sha256"], hashlib.sha256(path.read_bytes()).hexdigest()))
    argv = ["make-ooc", "--openimages", small_cfg.openimages, "--backgrounds", small_cfg.backgrounds,
            "--selection", small_cfg.selection, "--classes", small_cfg.classes,
            "--background-categories", small_cfg.background_categories, "--size", "48", "--out", small_cfg.out]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"({bg['uid']}): {path}: the file declares 40000 x 40000 px" in err
    assert not Path(small_cfg.out).exists()
    assert main([*argv, "--skip-bad"]) == 0
    assert "skipped 1 bad input(s)" in capsys.readouterr().out
    assert len(_manifest(Path(small_cfg.out))) == 4 * 3


@pytest.mark.parametrize("damage,message,left", [
    ("mask", "line 2 .*: mask .* is missing", 3 * 4),
    ("image", "line 2 .*: the mask's image .* is missing", 3 * 4),
    ("metadata", "line 2 .*: image .* has no row in .*images-with-rotation.csv", 3 * 4),
    ("class", "classes.csv line 3: class 'Coffee cup' \\(coffee_cup\\) has no foregrounds", 2 * 4),
    ("background", "line 6 .*: background .* is missing", 4 * 3),
])
def test_bad_inputs_are_named_and_skippable(small_cfg, damage, message, left, capsys):
    rows = _selection_rows(small_cfg)
    fg = rows[0]
    oi = Path(small_cfg.openimages)
    if damage == "mask":
        (oi / "validation-masks" / fg["mask_path"]).unlink()
    elif damage == "image":
        (oi / "validation" / f"{fg['image_id']}.jpg").unlink()
    elif damage == "metadata":
        p = oi / "validation-images-with-rotation.csv"
        p.write_text("".join(line for line in p.read_text().splitlines(True) if fg["image_id"] not in line))
    elif damage == "class":
        Path(small_cfg.selection).write_text("".join(
            line for line in Path(small_cfg.selection).read_text().splitlines(True) if ",coffee_cup," not in line))
    elif damage == "background":
        bg = next(r for r in rows if r["kind"] == "background")
        (Path(small_cfg.backgrounds) / bg["file"]).unlink()
    with pytest.raises(BitlabError, match=message):
        build.build(small_cfg)
    assert not Path(small_cfg.out).exists()
    # the CLI: exit 2 with the message; with --skip-bad: the rest is built and the skips listed
    argv = ["make-ooc", "--openimages", small_cfg.openimages, "--backgrounds", small_cfg.backgrounds,
            "--selection", small_cfg.selection, "--classes", small_cfg.classes,
            "--background-categories", small_cfg.background_categories, "--size", "48", "--out", small_cfg.out]
    capsys.readouterr()
    assert main(argv) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert main([*argv, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 bad input(s)" in printed
    assert len(_manifest(Path(small_cfg.out))) == left


def test_options_change_the_recipe(small_cfg):
    """Another --size cannot reuse images built at the old one; the same options can."""
    assert build.build(small_cfg)["composed"] == 16
    assert build.build(small_cfg)["reused"] == 16
    s = build.build(MakeOOCConfig(**{**small_cfg.__dict__, "size": 40}))
    assert s["composed"] == 16 and s["reused"] == 0
    assert cv2.imread(str(next(Path(small_cfg.out).glob("*/*.png")))).shape == (40, 40, 3)


def test_png_settings_are_lossless(small_cfg, tmp_path):
    fast = {r["file"]: r for r in _manifest(Path(build.build(small_cfg)["out"]))}
    small = build.build(MakeOOCConfig(**{**small_cfg.__dict__, "out": str(tmp_path / "small"), "png": "small"}))
    for r in _manifest(Path(small["out"])):
        assert r["pixel_sha256"] == fast[r["file"]]["pixel_sha256"]  # same pixels
        assert r["sha256"] != fast[r["file"]]["sha256"]  # other bytes
    size = {k: sum(p.stat().st_size for p in Path(d).glob("*/*.png")) for k, d in
            (("fast", small_cfg.out), ("small", small["out"]))}
    assert size["small"] < size["fast"]


def test_jpeg_format(small_cfg, tmp_path):
    cfg = MakeOOCConfig(**{**small_cfg.__dict__, "out": str(tmp_path / "jpg"), "format": "jpg", "jpeg_quality": 90})
    assert build.build(cfg)["composed"] == 16
    rows = _manifest(Path(cfg.out))
    assert all(r["file"].endswith(".jpg") and r["pixel_sha256"] == "" for r in rows)
    for r in rows:
        data = (Path(cfg.out) / r["file"]).read_bytes()
        assert data[:2] == b"\xff\xd8" and hashlib.sha256(data).hexdigest() == r["sha256"]
        assert cv2.imread(str(Path(cfg.out) / r["file"])).shape == (48, 48, 3)
    assert build.build(cfg)["reused"] == 16
    assert build.build(MakeOOCConfig(**{**cfg.__dict__, "jpeg_quality": 50}))["composed"] == 16  # new bytes
    with pytest.raises(BitlabError, match="--format must be one of png, jpg"):
        build.build(MakeOOCConfig(**{**cfg.__dict__, "format": "gif"}))


def test_feather_and_erode_recorded(small_cfg):
    s = build.build(MakeOOCConfig(**{**small_cfg.__dict__, "feather": 1.5, "erode": 1}))
    rows = _manifest(Path(s["out"]))
    assert {r["blend"] for r in rows} == {"erode:1+gaussian:1.5"}


def test_invalid_options(small_cfg):
    for bad in ({"size": 4}, {"object_scale": 1.5}, {"placement": "left"}, {"feather": -1},
                {"feather": float("nan")}, {"object_scale": float("nan")}, {"png": "tiny"}):
        with pytest.raises(BitlabError):
            build.build(MakeOOCConfig(**{**small_cfg.__dict__, **bad}))


# ----------------------------------------------------------------------------- the embedded sample
def test_demo_builds_in_seconds_and_the_real_model_agrees(tmp_path):
    out = build_demo(tmp_path / "demo")
    rows = _manifest(out)
    assert len(rows) == 9 * 12 and {r["class"] for r in rows} == {
        "zebra", "sea_lion", "penguin", "ostrich", "tiger", "teddy_bear", "tank", "lighthouse"}
    for r in rows:  # the longest object side is 80% of 512 on real pixels
        x0, y0, x1, y1 = map(int, r["fg_bbox_out"].split(","))
        assert abs(max(x1 - x0, y1 - y0) - 410) <= 1
    from bitlab.data import imagenet
    from bitlab.eval.predict import predict_files
    from bitlab.models import create_model, zoo

    model = create_model(zoo.OFFLINE_IMAGENET_MODEL)
    pred = predict_files(model, [out / r["file"] for r in rows], topk=5, progress=False)
    names = imagenet.names()
    right = {}
    for r, top in zip(rows, pred.indices):
        right.setdefault(r["class"], []).append(int(top[0]) in {int(i) for i in r["ilsvrc_indices"].split(";")})
        if r["class"] in ("zebra", "tiger"):  # recognised on every background
            assert right[r["class"]][-1], (r["file"], [names[i] for i in top])
    assert not all(right["sea_lion"]) and not all(right["penguin"])  # ... and these are not
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["counts"]["images"] == 108


def test_demo_records_each_sample_files_own_licence(tmp_path):
    """The sample is not Open Images: its manifest and ATTRIBUTION.md carry each photo's and each
    mask's own licence and author, from the sample's images table and backgrounds.csv."""
    out = build_demo(tmp_path / "demo", size=64)
    rows = _manifest(out)
    def table(path, key):
        return {r[key]: r for r in csv.DictReader(path.read_text().splitlines())}

    images = table(SAMPLE_DIR / "openimages" / "validation-images-with-rotation.csv", "ImageID")
    backgrounds = table(SAMPLE_DIR / "backgrounds" / "backgrounds.csv", "uid")
    for r in rows:
        meta, bg = images[r["fg_image_id"]], backgrounds[r["bg_uid"]]
        assert r["annotations_license"] == meta["AnnotationsLicense"] and r["annotations_license"].startswith("GPL-2")
        assert (r["fg_license"], r["fg_author"]) == (meta["License"], meta["Author"])
        assert (r["bg_license"], r["bg_author"], r["bg_provider"]) == (bg["license"], bg["author"], bg["provider"])
    assert {r["bg_license"].split(" (")[0] for r in rows} == {"GPL-2 or later", "public domain"}
    attribution = (out / "ATTRIBUTION.md").read_text()
    assert "Open Images" not in attribution.split("## Foreground photos")[0].replace("Open Images makes", "")
    for who in ("Albert Cahalan", "Jim Trice", "Sergey Nazarov", "Thomas K. Gibson", "NASA"):
        assert who in attribution


def test_demo_cli(tmp_path, capsys):
    assert main(["make-ooc", "--demo", "--out", str(tmp_path / "d")]) == 0
    assert "108 images (8 classes, 9 foregrounds x 12 backgrounds)" in capsys.readouterr().out
    assert len(list((tmp_path / "d").glob("*/*.png"))) == 108
    assert os.path.exists(tmp_path / "d" / "ATTRIBUTION.md")


def test_a_full_disk_names_the_image_and_a_rerun_resumes(tmp_path, small_disk, capsys):
    """The demo (108 composites of about 400 KB, then its variants) onto a real 16 MiB tmpfs: exit 2 naming the image being
    written and the full disk (it was a bare '[Errno 28]'), no temp file, no record; with room made
    (the tmpfs grown), the rerun keeps what was written and finishes."""
    disk = small_disk("16M")  # room for a few 16-image chunks, not for 108 images
    out = disk / "ooc"
    assert main(["make-ooc", "--demo", "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert f"bitlab make-ooc: error: {out}/" in err and ".png: cannot write this file, the disk is full" in err
    assert "Traceback" not in err and not list(out.rglob(".*.tmp"))
    written = len(list(out.rglob("*.png")))  # composites and any variant images
    assert 0 < written < 108 and not (out / "dataset.json").exists() and not (out / "manifest.csv").exists()
    subprocess.run(["mount", "-o", "remount,size=128M", str(disk)], check=True)  # the composites and variants
    assert main(["make-ooc", "--demo", "--out", str(out)]) == 0
    built, kept = map(int, re.search(r"built (\d+), kept (\d+)", capsys.readouterr().out).groups())
    meta = json.loads((out / "dataset.json").read_text())
    total = meta["counts"]["images"] + sum(v["images"] for v in meta["variants"].values())
    assert meta["counts"]["images"] == 108 and built + kept == total and 0 < kept <= written  # journalled images are kept (the last chunk's are redone)
    check_complete(out)
