"""`make-ooc plan`: filters, seeded choice, counts, and the errors when a plan cannot be met."""
from __future__ import annotations

import json
import shutil

import pytest

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.ooc.openimages import AnnotationFilter
from bitlab.ooc.select import PlanConfig, plan
from bitlab.ooc.spec import load_selection


def _cfg(inp, out, **kw) -> PlanConfig:
    base = dict(out=str(out), openimages=str(inp["openimages"]), backgrounds=str(inp["backgrounds"]),
                classes=str(inp["classes"]), background_categories=str(inp["categories"]), per_category=1,
                filters=AnnotationFilter(min_predicted_iou=0.5), min_object_px=40, min_background_px=32)
    return PlanConfig(**{**base, **kw})


def test_filters_keep_only_good_instances(small_inputs, tmp_path):
    sel, report = plan(_cfg(small_inputs, tmp_path / "sel.csv", per_class=3))
    # the clean instances: not group-of, depiction, truncated, rotated, low/no IoU or box-less
    good = {i.image_id for i in small_inputs["instances"]
            if not i.flags and i.rotation == "0.0" and i.iou == "0.9" and i.box_row}
    assert len(good) == 6
    assert {f.image_id for f in sel.foregrounds} == good
    f = report["funnel"]["cat"]
    assert f["masks"] == 11 and f["predicted_iou"] == 9 and f["box_flags"] == 5 and f["rotation"] == 3
    assert f["object_px"] == 3
    # the plan's record beside the selection
    record = json.loads((tmp_path / "sel.json").read_text())
    assert record["images"] == 6 * 2 and record["selection_sha256"] == fileio.sha256_file(tmp_path / "sel.csv")


def test_plan_is_deterministic_by_seed(small_inputs, tmp_path):
    a, _ = plan(_cfg(small_inputs, tmp_path / "a.csv", seed=0))
    b, _ = plan(_cfg(small_inputs, tmp_path / "b.csv", seed=0))
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    picks = {tuple(sorted(f.uid for f in plan(_cfg(small_inputs, tmp_path / f"s{s}.csv", seed=s))[0].foregrounds))
             for s in range(6)}
    assert len(picks) > 1  # 2 of 3 per class: other seeds choose others
    assert load_selection(tmp_path / "a.csv").foregrounds == a.foregrounds


def test_counts_follow_the_class_table(small_inputs, tmp_path):
    sel, _ = plan(_cfg(small_inputs, tmp_path / "sel.csv"))  # n_foregrounds = 2 per class
    assert sorted(f.folder for f in sel.foregrounds) == ["cat", "cat", "coffee_cup", "coffee_cup"]
    assert sorted(b.category for b in sel.backgrounds) == ["grass", "space"]
    sel, _ = plan(_cfg(small_inputs, tmp_path / "sel2.csv", per_category=2))
    assert len(sel.backgrounds) == 4


def test_too_few_foregrounds_is_a_clear_error(small_inputs, tmp_path):
    with pytest.raises(BitlabError) as e:
        plan(_cfg(small_inputs, tmp_path / "sel.csv", per_class=4))
    msg = str(e.value)
    assert "class 'Cat' (/m/01yrx" in msg and "3 usable foreground(s), need 4" in msg
    assert "masks 11, predicted_iou 9" in msg and "rotation 3" in msg
    assert not (tmp_path / "sel.csv").exists()  # nothing written
    with pytest.raises(BitlabError, match=r"3 usable foreground\(s\), need 3.*|object_px 0"):
        plan(_cfg(small_inputs, tmp_path / "sel.csv", per_class=3, min_object_px=10_000))


def test_missing_files_and_mask_resolution(small_inputs, tmp_path):
    """Masks on disk are 1.5625x their image; a candidate without its JPEG is passed over."""
    sel, _ = plan(_cfg(small_inputs, tmp_path / "a.csv", per_class=2))
    gone = sel.foregrounds[0]
    (small_inputs["openimages"] / "validation" / f"{gone.image_id}.jpg").unlink()
    sel2, report = plan(_cfg(small_inputs, tmp_path / "b.csv", per_class=2))
    assert gone.uid not in {f.uid for f in sel2.foregrounds}
    assert report["funnel"][gone.folder]["on_disk"] == 2


def test_background_problems(small_inputs, tmp_path):
    bg = small_inputs["backgrounds"]
    shutil.rmtree(bg / "space")
    (bg / "backgrounds.csv").write_text("category,file,uid\n")  # now only on-disk files count
    with pytest.raises(BitlabError, match=r"space: no images for category 'space' \(.*categories.csv line 3\)"):
        plan(_cfg(small_inputs, tmp_path / "sel.csv"))
    (bg / "space").mkdir()
    (bg / "space" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(BitlabError, match=r"background category 'space'.*0 usable file\(s\) of 1"):
        plan(_cfg(small_inputs, tmp_path / "sel.csv"))


def test_unknown_mid_and_missing_counts(small_inputs, tmp_path):
    classes = small_inputs["classes"]
    classes.write_text(classes.read_text().replace("/m/02p5f1q", "/m/0zzzzz"))
    with pytest.raises(BitlabError, match=r"classes.csv line 3: MID /m/0zzzzz \(Coffee cup\) is not in"):
        plan(_cfg(small_inputs, tmp_path / "sel.csv"))
    classes.write_text(classes.read_text().replace("/m/0zzzzz", "/m/02p5f1q").replace("967,2", "967,"))
    with pytest.raises(BitlabError, match="line 3: field 'n_foregrounds' is empty; fill it or pass --per-class"):
        plan(_cfg(small_inputs, tmp_path / "sel.csv"))


def test_replanning_the_embedded_sample_reproduces_it(tmp_path):
    """The committed sample selection is exactly what `plan` makes of the committed sample, with
    the limits its selection.json records (make_sample.py's)."""
    from bitlab.paths import SAMPLE_DIR

    recorded = json.loads((SAMPLE_DIR / "selection.json").read_text())["config"]
    assert recorded["filters"]["min_predicted_iou"] == 0.0 and recorded["min_background_px"] == 360
    cfg = PlanConfig(out=str(tmp_path / "selection.csv"), openimages=str(SAMPLE_DIR / "openimages"),
                     backgrounds=str(SAMPLE_DIR / "backgrounds"), classes=str(SAMPLE_DIR / "classes.csv"),
                     background_categories=str(SAMPLE_DIR / "background_categories.csv"),
                     filters=AnnotationFilter(**recorded["filters"]), min_background_px=recorded["min_background_px"],
                     min_object_px=recorded["min_object_px"], min_mask_fill=recorded["min_mask_fill"])
    plan(cfg)
    assert (tmp_path / "selection.csv").read_bytes() == (SAMPLE_DIR / "selection.csv").read_bytes()
    filters = AnnotationFilter(**{**recorded["filters"], "allow_truncated": False})
    with pytest.raises(BitlabError, match="class 'Lighthouse'.*need 1"):  # the tower runs out of the frame
        plan(PlanConfig(**{**cfg.__dict__, "filters": filters}))
    with pytest.raises(BitlabError, match="underwater.*need 1"):  # the reef photo is 448 x 376
        plan(PlanConfig(**{**cfg.__dict__, "min_background_px": 512}))
