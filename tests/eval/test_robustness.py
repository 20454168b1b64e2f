"""Evaluation sets (manifest, official class folders, wnid ImageFolder) and robustness scoring."""
from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from bitlab.data import imagenet
from bitlab.errors import BitlabError
from bitlab.eval import robustness
from bitlab.eval.robustness import EvalItem
from tests.eval.test_stats import wilson_by_hand
from tests.fixtures.ooc_sets import write_classes


def test_manifest_set_reads_classes_targets_and_backgrounds(tiny_ooc):
    ev = robustness.load_eval_set(tiny_ooc)
    assert (ev.kind, ev.role, len(ev.items)) == ("manifest", "ooc", 12)
    cat = next(it for it in ev.items if it.image == "cat/chelsea__grass.png")
    assert cat == EvalItem("cat/chelsea__grass.png", "cat", (281, 282, 285), "grass", "chelsea", "grass")
    assert {it.background for it in ev.items} == {"grass", "brick", "gravel", "in-context"}
    assert all(p.is_file() for p in ev.paths())
    assert ev.describe()["num_foregrounds"] == 3


def _official_layout(tiny_ooc, tmp_path, folders: dict[str, str]):
    """The released zip's layout: one folder per class, no manifest, no backgrounds."""
    root = tmp_path / "official"
    for src, dst in folders.items():
        shutil.copytree(tiny_ooc / src, root / dst)
    return root


def test_official_folders_map_by_folder_name_or_ilsvrc_name(tiny_ooc, tmp_path):
    # 'cat' is the table's folder, 'Coffee' its OpenImages name, 'projectile' an ILSVRC lemma of the rocket's synsets
    root = _official_layout(tiny_ooc, tmp_path, {"cat": "cat", "espresso": "Coffee", "missile": "projectile"})
    ev = robustness.load_eval_set(root, classes=write_classes(tmp_path / "classes.csv"))
    assert (ev.kind, ev.role) == ("ooc-folders", "ooc")
    by_folder = {it.image.split("/")[0]: it for it in ev.items}
    assert by_folder["projectile"].cls == "missile" and by_folder["projectile"].targets == (657, 744)
    assert by_folder["Coffee"].targets == (967,)
    assert all(it.background == "" for it in ev.items)


def test_unknown_class_folder_is_named(tiny_ooc, tmp_path):
    root = _official_layout(tiny_ooc, tmp_path, {"cat": "cat", "espresso": "teapot"})
    with pytest.raises(BitlabError, match=r"teapot.*not in the class table.*known: cat, espresso, missile"):
        robustness.load_eval_set(root, classes=write_classes(tmp_path / "classes.csv"))


def test_zip_extracted_one_level_up_gets_a_hint(tiny_ooc, tmp_path):
    root = _official_layout(tiny_ooc, tmp_path, {"cat": "bit_out_of_context_dataset/cat"})
    with pytest.raises(BitlabError, match=r"did you mean --data .*official/bit_out_of_context_dataset\?"):
        robustness.load_eval_set(root, classes=write_classes(tmp_path / "classes.csv"))


def test_missing_class_table_is_an_error(tiny_ooc, tmp_path, monkeypatch):
    monkeypatch.setattr(robustness, "DEFAULT_CLASS_TABLE", tmp_path / "nowhere.csv")
    root = _official_layout(tiny_ooc, tmp_path, {"cat": "cat"})
    with pytest.raises(BitlabError, match="no class table"):
        robustness.load_eval_set(root)


def test_wnid_imagefolder_is_a_validation_set(tiny_ooc, tmp_path):
    root = tmp_path / "val"
    shutil.copytree(tiny_ooc / "cat", root / "n02123045")
    ev = robustness.load_eval_set(root)
    assert (ev.kind, ev.role) == ("imagefolder", "val")
    assert {it.targets for it in ev.items} == {(imagenet.index_of()["n02123045"],)} and len(ev.items) == 4
    assert robustness.load_eval_set(root, role="ooc").role == "ooc"


def test_usual_context_pairs_are_reported_apart():
    items = [EvalItem("a1", "a", (1,), "sea", "fa", "s", usual_context=True), EvalItem("a2", "a", (1,), "road", "fa", "r"),
             EvalItem("b1", "b", (2, 3), "sea", "fb", "s"), EvalItem("b2", "b", (2, 3), "road", "fb", "r")]
    df = robustness.predictions_table(items, _table()[[f"top{j}_id" for j in range(1, 6)]].to_numpy(),
                                      np.full((4, 5), 0.1, np.float32), np.zeros(4))
    s = robustness.summarize(df)
    assert s["top1"] == 0.5  # a on sea (its usual context) was right
    away = s["excluding_usual_context"]
    assert (away["n"], away["top1"], away["top5"]) == (3, 1 / 3, 2 / 3)
    assert away["top1_ci"] == pytest.approx(list(wilson_by_hand(1, 3)))
    assert "excluding_usual_context" not in robustness.summarize(_table())  # none marked: nothing to exclude


def test_empty_and_broken_sets_name_the_culprit(tiny_ooc, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BitlabError, match="empty dataset"):
        robustness.load_eval_set(tmp_path / "empty")
    (tmp_path / "empty" / "n02123045").mkdir()
    with pytest.raises(BitlabError, match="empty dataset"):
        robustness.load_eval_set(tmp_path / "empty")
    with pytest.raises(BitlabError, match="not found"):
        robustness.load_eval_set(tmp_path / "nope")

    root = tmp_path / "m"
    shutil.copytree(tiny_ooc, root)
    rows = list(csv.DictReader((root / "manifest.csv").open()))
    original = rows[3]["file"]
    rows[3]["file"] = "cat/gone.png"
    rows[5]["ilsvrc_indices"] = "1000"

    def write(rs):
        with (root / "manifest.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rs[0]))
            w.writeheader()
            w.writerows(rs)

    write(rows)
    with pytest.raises(BitlabError, match=r"manifest.csv: row 5: image 'cat/gone.png' not found"):
        robustness.load_eval_set(root)
    rows[3]["file"] = "../../etc/passwd"
    write(rows)
    with pytest.raises(BitlabError, match="row 5: file '../../etc/passwd' points outside"):
        robustness.load_eval_set(root)
    rows[3]["file"] = original
    write(rows)
    with pytest.raises(BitlabError, match="row 7: ilsvrc_indices 1000 is outside 0..999"):
        robustness.load_eval_set(root)
    rows[5]["ilsvrc_indices"] = rows[4]["ilsvrc_indices"]
    for r in rows:
        r["usual_context"] = "false"
    rows[2]["usual_context"] = "yes"
    write(rows)
    with pytest.raises(BitlabError, match="row 4: field 'usual_context' must be true or false, got 'yes'"):
        robustness.load_eval_set(root)
    rows[2]["usual_context"] = "true"
    write(rows)
    assert [it.usual_context for it in robustness.load_eval_set(root).items].count(True) == 1


def test_manifest_without_targets_uses_the_class_table(tiny_ooc, tmp_path):
    root = tmp_path / "m"
    shutil.copytree(tiny_ooc, root)
    rows = [{"file": r["file"], "class": r["class"]} for r in csv.DictReader((root / "manifest.csv").open())]
    with (root / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "class"])
        w.writeheader()
        w.writerows(rows)
    ev = robustness.load_eval_set(root)  # root/classes.csv
    assert ev.role == "val" and ev.items[0].targets == (281, 282, 285)


def test_label_map_reads_wnids_indices_and_blanks(tmp_path):
    f = tmp_path / "map.txt"
    f.write_text("n01440764\n5\n-\n\n# comment only\n")
    assert robustness.read_label_map(f).tolist() == [0, 5, -1, -1, -1]
    f.write_text("n01440764\ncat\n")
    with pytest.raises(BitlabError, match=r"map.txt: line 2: 'cat'"):
        robustness.read_label_map(f)


def _table():
    """4 images, 2 classes x 2 backgrounds; targets: a -> {1}, b -> {2, 3}."""
    items = [EvalItem("a1", "a", (1,), "sea", "fa", "s"), EvalItem("a2", "a", (1,), "road", "fa", "r"),
             EvalItem("b1", "b", (2, 3), "sea", "fb", "s"), EvalItem("b2", "b", (2, 3), "road", "fb", "r")]
    ids = np.array([[1, 9, 8, 7, 6],    # a on sea: right
                    [9, 1, 8, 7, 6],    # a on road: top-5 only
                    [3, 9, 8, 7, 6],    # b on sea: right (second synset)
                    [9, 8, 7, 6, 5]])   # b on road: wrong
    probs = np.full((4, 5), 0.1, np.float32)
    return robustness.predictions_table(items, ids, probs, np.array([0.5, 0.2, 0.6, 0.0]))


def test_scoring_is_top1_in_the_class_set():
    df = _table()
    assert df["top1_correct"].tolist() == [True, False, True, False]
    assert df["top5_correct"].tolist() == [True, True, True, False]
    assert df["top1_name"].tolist()[0] == imagenet.names()[1]


def test_summary_breakdowns():
    s = robustness.summarize(_table())
    assert (s["top1"], s["top5"], s["n"]) == (0.5, 0.75, 4)
    # 2 objects: too few to resample; Wilson over the images, and the method says so
    assert s["ci"] == "wilson over images (2 objects)"
    assert s["top1_ci"] == pytest.approx(list(wilson_by_hand(2, 4)))
    a = s["per_class"]["a"]
    assert (a["n"], a["top1"], a["top5"]) == (2, 0.5, 1.0) 
    assert a["top5_ci"] == pytest.approx(list(wilson_by_hand(1, 1)))  # one object, right on both: counted once
    assert s["per_background"]["road"]["top1"] == 0.0 and s["per_background"]["sea"]["top1"] == 1.0
    assert s["per_background"]["road"]["ci"] == "wilson"  # one image per object: independent
    assert s["class_background_top1"] == {"a": {"road": 0.0, "sea": 1.0}, "b": {"road": 0.0, "sea": 1.0}}
    assert s["class_background_n"] == {"a": {"road": 1, "sea": 1}, "b": {"road": 1, "sea": 1}}
    # 0 of 2 against 2 of 2: the intervals overlap, so no background is named
    assert s["most_fooling_backgrounds"] == []
    assert s["most_fooling_backgrounds_note"].startswith("no background is separated")
    worst = robustness.most_fooling_backgrounds(_table())[0]  # the plain ranking, with its interval
    assert worst["background"] == "road" and worst["top1_error"] == 1.0
    assert worst["top1_error_ci"] == pytest.approx([1 - h for h in wilson_by_hand(0, 2)[::-1]])
    assert worst["wrong_predictions"] == [[imagenet.names()[9], 2]]
    effect = s["background_effect"]  # both classes right on the sea, wrong on the road: all background
    assert (effect["background"], effect["class"], effect["background_dependent"]) == (1.0, 0.0, 1.0)
    assert effect["p_value"] > 0.3  # but 2 x 2 cells line up by chance every other shuffle
    fg = s["per_foreground"]
    assert fg["count"] == 2 and fg["fooled_by_any"] == 2 and fg["fooled_by_all"] == 0
    assert fg["objects"]["fb"]["fooling_backgrounds"] == ["road"] and fg["mean_fooled_fraction"] == 0.5
    assert fg["objects"]["fb"]["fooled_ci"] == pytest.approx(list(wilson_by_hand(1, 2)))


def test_rankings_name_only_what_the_intervals_separate():
    """12 objects on 4 backgrounds: 'road' fools every object, 'dust' every third; only road is
    separated from the rest, and the per-class ranking names the class a model never gets."""
    items, rows = [], []
    for o in range(12):
        for b in ("sea", "sky", "road", "dust"):
            cls = "hard" if o < 6 else "easy"
            items.append(EvalItem(f"{o}/{b}", cls, (1,), b, f"f{o}", b))
            right = b != "road" and not (b == "dust" and o % 3 == 0) and not (cls == "hard" and b == "sky")
            rows.append([1 if right else 7, 2, 3, 4, 5])
    df = robustness.predictions_table(items, np.array(rows), np.full((48, 5), 0.2, np.float32), np.zeros(48))
    s = robustness.summarize(df)
    assert [r["background"] for r in s["most_fooling_backgrounds"]] == ["road"]
    road = s["most_fooling_backgrounds"][0]
    assert road["n"] == 12 and road["top1"] == 0.0 and road["top1_ci"][1] < road["rest_top1_ci"][0]
    assert road["wrong_predictions"] == [[imagenet.names()[7], 12]]
    assert "1 of 4 separated" in s["most_fooling_backgrounds_note"]
    # two classes of 6 objects each: 'hard' (right on 2 of 4 backgrounds at best) vs 'easy'
    assert s["ci"] == "bootstrap over objects, 12 objects"
    assert [r["class"] for r in s["hardest_classes"]] in ([], ["hard"])  # only if the intervals allow
    hard, easy = s["per_class"]["hard"], s["per_class"]["easy"]
    separated = hard["top1_ci"][1] < easy["top1_ci"][0]
    assert bool(s["hardest_classes"]) == separated


def test_official_folders_against_the_shipped_class_table(tiny_ooc, tmp_path):
    """Folder names as the release might spell them: OpenImages names, ILSVRC lemmas, wnids, the
    paper's own names (aliases)."""
    folders = ["Traffic light", "studio_couch", "hammerhead", "n02391049", "Sofa"]
    root = _official_layout(tiny_ooc, tmp_path, {"cat": "Traffic light"})
    for name in list(folders)[1:]:
        shutil.copytree(tiny_ooc / "cat", root / name)
    ev = robustness.load_eval_set(root, classes=robustness.DEFAULT_CLASS_TABLE)
    assert ev.kind == "ooc-folders"
    got = {it.image.split("/")[0]: (it.cls, it.targets) for it in ev.items}
    assert got["Traffic light"] == ("traffic_light", (920,))
    assert got["studio_couch"][0] == "couch"
    assert got["hammerhead"] == ("shark", (2, 3, 4))  # a shark folder counts all three shark synsets
    assert got["n02391049"][0] == "zebra"
    assert got["Sofa"] == ("couch", (831,))  # paper F.2 names the couch class "Sofa"


def _evaluate_cli(root, out, capsys) -> tuple[int, str]:
    from bitlab.cli import main

    rc = main(["evaluate", "--model", "R14x0.5", "--random-init", "--image-size", "32", "--data", str(root),
               "--out", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_manifest_encodings_and_repeated_rows(tiny_ooc, tmp_path, capsys):
    root = tmp_path / "m"
    shutil.copytree(tiny_ooc, root)
    manifest = root / "manifest.csv"
    good = manifest.read_bytes()
    n_rows = len(good.splitlines()) - 1
    # a BOM, as spreadsheet programs write "CSV UTF-8": read as usual
    manifest.write_bytes(b"\xef\xbb\xbf" + good)
    assert len(robustness.load_eval_set(root).items) == n_rows
    # a byte that is not UTF-8: the file, the line and the byte, through the CLI, nothing written
    lines = good.splitlines(keepends=True)
    manifest.write_bytes(b"".join(lines[:2]) + lines[2].rstrip(b"\n") + b"\xff\n" + b"".join(lines[3:]))
    rc, err = _evaluate_cli(root, tmp_path / "out", capsys)
    assert rc == 2 and f"error: {manifest} line 3: byte 0xff at column" in err and "not UTF-8" in err
    assert not (tmp_path / "out").exists()
    # the same image twice: an error naming both rows (counted twice it would weigh double)
    manifest.write_bytes(good + lines[3])
    rc, err = _evaluate_cli(root, tmp_path / "out", capsys)
    file = next(csv.DictReader([lines[0].decode(), lines[3].decode()]))["file"]
    assert rc == 2 and f"error: {manifest}: row {n_rows + 2}: image '{file}' is listed again (first on row 4)" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- heads
def test_head_classes_map_by_wnid_class_table_and_ilsvrc_name(tmp_path):
    """A run's class names in head order -> what each output stands for: a wnid, a class of the table by
    folder or name (its whole ILSVRC set; the table wins over an ILSVRC name), an ILSVRC short name or
    another lemma that names one class."""
    table = robustness.load_classes(write_classes(tmp_path / "classes.csv"))
    head = robustness.head_from_classes(["n01440764", "cat", "Coffee", "goldfish", "tabby cat", "missile"], table,
                                        "run")
    assert head.ilsvrc == ((0,), (281, 282, 285), (967,), (1,), (281,), (657, 744))
    assert (head.way, head.subset) == (6, True)
    assert head.note == "6-way head: an easier task than the paper's 1000-way models"
    assert head.right_outputs((282,)).tolist() == [1] and head.right_outputs((281, 283)).tolist() == [1, 4]
    assert head.scores((744,)) and not head.scores((2,))
    # the ILSVRC class each output answered stands for on its image: the image's own when it covers it
    assert head.ilsvrc_ids(np.array([[1, 5], [1, 0]]), [(282,), (3,)]).tolist() == [[282, 657], [281, 0]]
    assert robustness.head_from_classes(list(imagenet.wnids()), table, "run") is None  # ILSVRC-2012's own head


def test_classes_that_map_to_nothing_or_to_several_are_one_error(tmp_path):
    table = robustness.load_classes(write_classes(tmp_path / "classes.csv"))
    with pytest.raises(BitlabError) as e:
        robustness.head_from_classes(["cat", "giraffe_xyz", "crane", "7"], table, "runs/x/final.pt")
    message = str(e.value)
    assert message.startswith("runs/x/final.pt: 'giraffe_xyz', '7' map to no ILSVRC-2012 class; 'crane' names 2 "
                              "ILSVRC-2012 classes (n02012849 crane, n03126707 crane): use its wnid.")
    assert message.endswith("--label-map FILE (one ILSVRC-2012 wnid or '-' per output, 4 lines in head order)")


def test_a_label_map_is_a_head_map_too(tmp_path):
    (tmp_path / "map.txt").write_text("n02123045\n-\n967\n")
    head = robustness.head_from_label_map(tmp_path / "map.txt")
    assert head.ilsvrc == ((281,), (), (967,)) and head.names == ("n02123045", "-", "n07920052") and head.way == 2
    full = tmp_path / "full.txt"
    full.write_text("\n".join(imagenet.wnids()[::-1]) + "\n")  # all 1000, in another order: the paper's task
    assert not robustness.head_from_label_map(full).subset and robustness.head_from_label_map(full).note == ""


def _grid(cells: list[list[int]]) -> "pd.DataFrame":
    """A predictions-like table: one image per (class row, background column), right when 1."""
    import pandas as pd

    return pd.DataFrame([{"class": f"c{i}", "background": f"b{j}", "top1_correct": bool(v)}
                         for i, row in enumerate(cells) for j, v in enumerate(row)])


def test_background_effect_splits_the_heat_map_variance():
    stripes = [[1] * 8, [0] * 8, [1] * 8, [0] * 8, [1] * 8, [1] * 8]  # a class effect only
    e = robustness.background_effect(_grid(stripes))
    assert (e["class"], e["background"], e["background_dependent"]) == (1.0, 0.0, 0.0) and e["p_value"] == 1.0
    columns = [[0, 0, 0, 1, 1, 1, 1, 1]] * 6  # three backgrounds fool every class
    e = robustness.background_effect(_grid(columns))
    assert (e["class"], e["background"], e["class_x_background"]) == (0.0, 1.0, 0.0)
    assert e["p_value"] < 0.01 and e["permutations"] == 2000  # six rows lining up by chance: (3!5!/8!)^5
    checkers = [[(i + j) % 2 for j in range(8)] for i in range(6)]  # each background fools half the classes
    e = robustness.background_effect(_grid(checkers))
    assert e["class_x_background"] == pytest.approx(1.0) and e["background_dependent"] == pytest.approx(1.0)
    mixed = [[1, 1, 0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]]
    e = robustness.background_effect(_grid(mixed))
    a = np.array(mixed, float)
    ss = ((a - a.mean()) ** 2).sum()
    assert e["class"] == pytest.approx(8 * ((a.mean(1) - a.mean()) ** 2).sum() / ss)
    assert e["background"] == pytest.approx(3 * ((a.mean(0) - a.mean()) ** 2).sum() / ss)
    assert e["p_value"] == robustness.background_effect(_grid(mixed))["p_value"]  # seeded


def test_background_effect_needs_a_full_varying_table():
    assert robustness.background_effect(_grid([[1, 1], [1, 1]])) is None  # nothing varies
    holey = _grid([[1, 0, 1], [0, 1, 1]]).drop(index=1)
    assert robustness.background_effect(holey) is None  # an empty cell
    assert robustness.background_effect(_grid([[1, 0, 1]])) is None  # one class: no table
