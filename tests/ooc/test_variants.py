"""`make-ooc --variants`: only_fg, no_fg and mixed_rand beside the composites, from the same selection
and geometry, checked on real pixels against what the composites and the inputs show."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from bitlab.cli import main
from bitlab.errors import BitlabError
from bitlab.ooc import build, compose, variants
from bitlab.ooc.build import MakeOOCConfig


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ("dataset.json", "config.json")}


@pytest.fixture
def built(plan_small, tmp_path):
    """The small inputs (2 classes x 2 objects, grass and space x 2 files; grass is usual for cats)."""
    inp, sel = plan_small
    cfg = MakeOOCConfig(out=str(tmp_path / "out"), openimages=str(inp["openimages"]),
                        backgrounds=str(inp["backgrounds"]), selection=str(sel), classes=str(inp["classes"]),
                        background_categories=str(inp["categories"]), size=48, workers=2,
                        variants=["mixed_rand", "no_fg", "only_fg"])
    return cfg, build.build(cfg)


def test_each_variant_has_its_folder_manifest_and_counts(built):
    cfg, summary = built
    out = Path(cfg.out)
    assert cfg.variants == ["only_fg", "no_fg", "mixed_rand"]  # canonical order, whatever was asked
    assert summary["images"] == 16 and summary["variants"] == {"only_fg": 4, "no_fg": 4, "mixed_rand": 16}
    composites = _rows(out / "manifest.csv")
    assert {r["variant"] for r in composites} == {"composite"} and len(composites) == 16
    for v, n in summary["variants"].items():
        rows = _rows(out / "variants" / v / "manifest.csv")
        assert len(rows) == n and {r["variant"] for r in rows} == {v}
        folder = out / "variants" / v  # files relative to the variant's own folder: it stands alone
        assert all(hashlib.sha256((folder / r["file"]).read_bytes()).hexdigest() == r["sha256"] for r in rows)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"]["images"] == 16 and meta["variants_grey"] == 128
    assert {v: m["images"] for v, m in meta["variants"].items()} == summary["variants"]
    assert meta["variants"]["no_fg"]["manifest_sha256"] == hashlib.sha256(
        (out / "variants/no_fg/manifest.csv").read_bytes()).hexdigest()
    assert len(list(out.glob("*/*.png"))) == 16  # the composites' class folders hold only composites


def test_no_fg_is_the_background_square_and_only_fg_the_object_on_grey(built):
    cfg, _ = built
    out = Path(cfg.out)
    no_fg = {r["bg_uid"]: r for r in _rows(out / "variants/no_fg/manifest.csv")}
    only_fg = {r["fg_uid"]: r for r in _rows(out / "variants/only_fg/manifest.csv")}
    assert all(r["class"] == "" and r["fg_uid"] == "" for r in no_fg.values())
    for r in _rows(out / "manifest.csv"):
        bg = compose.decode(Path(cfg.backgrounds) / r["bg_file"])
        side = min(bg.shape[:2])
        square = cv2.resize(bg[:side, :side], (48, 48), interpolation=cv2.INTER_AREA)  # paper F.1, by hand
        bare = cv2.imread(str(out / "variants/no_fg" / no_fg[r["bg_uid"]]["file"]))
        assert np.array_equal(bare, square)
        composite = cv2.imread(str(out / r["file"]))
        alone = cv2.imread(str(out / "variants/only_fg" / only_fg[r["fg_uid"]]["file"]))
        obj = np.any(composite != square, axis=2)  # where the object covers the background
        assert obj.sum() > 100
        assert np.array_equal(alone[obj], composite[obj])  # the same object at the same place
        grey = np.all(alone == 128, axis=2)
        assert np.all(grey | np.all(alone == composite, axis=2))  # elsewhere: grey 128 (or the object)
        assert grey.sum() > 0.2 * 48 * 48
        assert only_fg[r["fg_uid"]]["paste_xy"] == r["paste_xy"] and only_fg[r["fg_uid"]]["bg_uid"] == ""


def test_mixed_rand_is_the_object_on_another_categorys_background(built):
    cfg, _ = built
    out = Path(cfg.out)
    composites = {(r["fg_uid"], r["bg_uid"]): r for r in _rows(out / "manifest.csv")}
    usual = {("grass", "cat")}
    for r in _rows(out / "variants/mixed_rand/manifest.csv"):
        pair = composites[r["fg_uid"], r["pair_bg_uid"]]
        assert r["file"].endswith(Path(pair["file"]).name)  # named after the composite it stands beside
        assert r["bg_category"] != pair["bg_category"]
        # no usual context unless none is left (a cat on space: the only other category is grass)
        assert (r["bg_category"], r["class"]) not in usual or pair["bg_category"] == "space"
        assert r["usual_context"] == str((r["bg_category"], r["class"]) in usual).lower()
        # every selected background carries every object: the pixels are that composite's
        assert r["pixel_sha256"] == composites[r["fg_uid"], r["bg_uid"]]["pixel_sha256"]
        assert r["paste_xy"] == pair["paste_xy"]


def test_variants_rebuild_byte_identical_and_resume(built, capsys):
    cfg, _ = built
    out = Path(cfg.out)
    reference = _digest(out)
    again = build.build(cfg)
    assert again["composed"] == 0 and _digest(out) == reference
    for rel in ("variants/only_fg/manifest.csv", "variants/no_fg/grass/grass_0.png"):
        (out / rel).unlink()
    victims = sorted((out / "variants/mixed_rand").rglob("*.png"))[:3]
    for p in victims:
        p.unlink()
    victims[0].with_name(f".{victims[0].name}.x.tmp").write_bytes(b"half")  # a killed write
    resumed = build.build(cfg)
    assert resumed["composed"] == 4  # exactly the missing images
    assert _digest(out) == reference


def test_the_mixed_rand_draw_follows_the_seed(built, tmp_path):
    cfg, _ = built
    draws = {}
    for seed in range(4):
        other = MakeOOCConfig(**{**cfg.__dict__, "out": str(tmp_path / f"s{seed}"), "seed": seed,
                                 "variants": ["mixed_rand"]})
        build.build(other)
        draws[seed] = [r["bg_uid"] for r in _rows(Path(other.out) / "variants/mixed_rand/manifest.csv")]
    assert len({tuple(d) for d in draws.values()}) > 1
    # the seed moves only the draw: centred composites are the same bytes
    def composites(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.glob("*/*.png")}

    assert composites(tmp_path / "s3") == composites(Path(cfg.out))


def test_random_placement_gives_one_only_fg_per_pair_at_its_composites_place(plan_small, tmp_path):
    inp, sel = plan_small
    cfg = MakeOOCConfig(out=str(tmp_path / "out"), openimages=str(inp["openimages"]),
                        backgrounds=str(inp["backgrounds"]), selection=str(sel), classes=str(inp["classes"]),
                        background_categories=str(inp["categories"]), size=48, workers=1, placement="random",
                        variants=["only_fg", "mixed_rand"])
    build.build(cfg)
    out = Path(cfg.out)
    composites = {(r["fg_uid"], r["bg_uid"]): r for r in _rows(out / "manifest.csv")}
    alone = _rows(out / "variants/only_fg/manifest.csv")
    assert len(alone) == 16 and len({r["paste_xy"] for r in composites.values()}) > 1
    for r in alone + _rows(out / "variants/mixed_rand/manifest.csv"):
        assert r["paste_xy"] == composites[r["fg_uid"], r["pair_bg_uid"]]["paste_xy"]


def test_unknown_or_repeated_variants_are_refused(built, tmp_path):
    cfg, _ = built
    for bad, message in ((["only_bg"], "unknown variant 'only_bg'"), (["no_fg", "no_fg"], "listed twice")):
        with pytest.raises(BitlabError, match=message):
            build.build(MakeOOCConfig(**{**cfg.__dict__, "out": str(tmp_path / "x"), "variants": bad}))
    assert not (tmp_path / "x").exists()
    assert variants.check(["no_fg", "only_fg"]) == ["only_fg", "no_fg"]


def test_demo_builds_every_variant_and_the_cli_can_leave_them_out(tmp_path, capsys):
    assert main(["make-ooc", "--demo", "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert "variants in" in printed and "only_fg" in printed and "mixed_rand" in printed
    for v in variants.VARIANTS:
        assert (tmp_path / "d" / "variants" / v / "manifest.csv").is_file()
    assert main(["make-ooc", "--demo", "--variants", "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "variants").exists()
    assert main(["make-ooc", "--demo", "--variants", "no_fg", "--out", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one" / "variants").iterdir()] == ["no_fg"]
