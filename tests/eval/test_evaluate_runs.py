"""The chain the paper's card names: `bitlab finetune` a model, `bitlab evaluate` the run on the
out-of-context set and on its validation split (its classes map to the scoring by name, no label map),
`bitlab report` it beside a 1000-way model. Real images: crops of the embedded sample's photos."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from matplotlib.legend import Legend

from bitlab import report
from bitlab.cli import main
from bitlab.data.transforms import DataConfig, decode_image, eval_image, normalize, to_chw_tensor
from bitlab.eval.results import load_results
from bitlab.models import create_model, zoo
from tests.fixtures.runs import TINY_FINETUNE, sample_class_folders

NOTE = "3-way head: an easier task than the paper's 1000-way models"
FAST = ["--workers", "0", "--no-progress"]


def finetuned(tmp: Path, folders: dict[str, str], steps: tuple[str, ...] = ("1", "2", "3", "4", "6")
              ) -> tuple[Path, Path]:
    """(run directory, data) of `bitlab finetune` from scratch on `sample_class_folders(folders)`."""
    data, run = sample_class_folders(tmp / "data", folders), tmp / "run"
    assert main(["finetune", *TINY_FINETUNE, "--data", str(data), "--out", str(run), "--schedule", *steps]) == 0
    return run, data


@pytest.fixture(scope="module")
def ooc(tmp_path_factory) -> Path:
    from bitlab.ooc.build import build_demo

    # `bitlab make-ooc --demo`, composites only (the context variants are tests/eval/test_context.py's)
    return build_demo(tmp_path_factory.mktemp("ooc") / "demo_ooc", variants=[])


@pytest.fixture(scope="module")
def wnid_run(tmp_path_factory) -> tuple[Path, Path]:
    """Fine-tuned on ILSVRC-2012 wnid folders: tiger, zebra, teddy (3 of the demo set's 8 classes)."""
    return finetuned(tmp_path_factory.mktemp("wnids"), {"tiger": "n02129604", "zebra": "n02391049",
                                                        "teddy_bear": "n04399382"})


def _evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args, *FAST])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_finetune_then_evaluate_the_run_on_ooc_and_val_then_report(wnid_run, ooc, tmp_path, capsys):
    run, data = wnid_run
    code, out, err = _evaluate(capsys, "--model", str(run), "--data", str(ooc), "--out", str(tmp_path / "run_ooc"))
    assert code == 0, err
    assert f"R14x0.5 [{run.name}] on {ooc.resolve()} (36 images, ooc): top-1" in out
    assert f"  {NOTE}; 72 images of other classes left out" in out
    s = json.loads((tmp_path / "run_ooc" / "summary.json").read_text())
    assert (s["model"]["name"], s["model"]["run"]) == ("R14x0.5", str(run))
    assert s["model"]["pretrained"] == str(run / "final.pt")
    assert s["model"]["pretraining_data"] == "none (trained from scratch)" and s["model"]["num_outputs"] == 3
    assert s["model"]["head"]["classes"] == [["n02129604", ["n02129604"]], ["n02391049", ["n02391049"]],
                                             ["n04399382", ["n04399382"]]]
    assert s["task"] == {"way": 3, "subset": True, "note": NOTE, "images_left_out": 72,
                         "classes_left_out": ["lighthouse", "ostrich", "penguin", "sea_lion", "tank"]}
    assert s["n"] == 36 and set(s["per_class"]) == {"tiger", "zebra", "teddy_bear"}
    view = s["model"]["data_config"]
    assert (view["input_size"], view["crop_pct"]) == (56, 1.0)  # the run's validation view
    # Every verdict is the run's own top-1 class, read by its name: a forward pass of final.pt by hand.
    model = create_model("R14x0.5", pretrained=run / "final.pt").eval()
    view = DataConfig(**{**view, "mean": tuple(view["mean"]), "std": tuple(view["std"])})
    df = pd.read_csv(tmp_path / "run_ooc" / "predictions.csv", keep_default_na=False)
    x = torch.cat([normalize(to_chw_tensor(eval_image(decode_image(ooc / f), view))[None], view.mean, view.std)
                   for f in df["image"]])
    with torch.inference_mode():
        top1 = model(x).argmax(-1).numpy()
    own = {"tiger": 0, "zebra": 1, "teddy_bear": 2}  # the class folders' (wnids') order is the head's
    assert (df["top1_correct"].to_numpy() == (top1 == df["class"].map(own).to_numpy())).all()
    assert set(df["top1_name"]) <= {"tiger", "zebra", "teddy"} and "top4_id" not in df

    # On the run's validation split (wnid folders): the run's own validation view, so its own numbers.
    code, out, err = _evaluate(capsys, "--model", str(run), "--data", str(data / "val"), "--out",
                               str(tmp_path / "run_val"))
    assert code == 0, err
    val, own_val = (json.loads(p.read_text()) for p in (tmp_path / "run_val" / "summary.json", run / "summary.json"))
    assert val["dataset"]["role"] == "val" and val["n"] == own_val["n"] == 6
    assert abs(val["top1"] - own_val["top1"]) <= 1 / 6 + 1e-9  # at most one near-tie read the other way

    # Beside a 1000-way model, marked wherever they meet.
    for role, where in (("ooc", ooc), ("val", data / "val")):
        code, _, err = _evaluate(capsys, "--model", zoo.OFFLINE_IMAGENET_MODEL, "--data", str(where), "--out",
                                 str(tmp_path / f"lite0_{role}"), "--label", "Lite0")
        assert code == 0, err
    dirs = [str(tmp_path / d) for d in ("lite0_ooc", "run_ooc", "lite0_val", "run_val")]
    assert main(["report", *dirs, "--out", str(tmp_path / "figures")]) == 0
    printed = capsys.readouterr().out
    for stem in ("fig12_left_top5", "fig13_top5", "fig12_right_val_vs_ooc", f"backgrounds_R14x0.5-{run.name}"):
        assert (tmp_path / "figures" / f"{stem}.png").is_file(), stem
    assert printed.count("3-way (easier task)") == 2 and printed.count("1000-way ") == 2  # the table's head column
    results = [load_results(d) for d in dirs]
    fig = report.fig_val_vs_ooc(results)
    legends = [c for c in fig.axes[0].get_children() if isinstance(c, Legend)]
    texts = [t.get_text() for leg in legends for t in leg.get_texts()]
    assert NOTE in texts and "1000-way head (the paper's task)" in texts
    first = results[1].predictions["image"].tolist()[:1]
    assert NOTE in report.fig_top5(results[0], results[1], first)._suptitle.get_text()
    assert f"R14x0.5 [{run.name}] (3-way head)" in report.fig_backgrounds(results[1]).axes[0].get_title()


def test_pretrained_final_pt_alone_or_with_its_name_evaluates_the_same(wnid_run, ooc, tmp_path, capsys):
    """`--pretrained FILE` alone takes the name from the file; `--model NAME --pretrained FILE` (which
    refused a 3-way head before) maps the classes the same way; a checkpoint.pt works too."""
    run, _ = wnid_run
    outs = []
    for args in (["--pretrained", str(run / "final.pt")], ["--model", "R14x0.5", "--pretrained", str(run / "final.pt")],
                 ["--pretrained", str(run / "checkpoint.pt")]):
        outs.append(tmp_path / f"r{len(outs)}")
        code, _, err = _evaluate(capsys, *args, "--data", str(ooc), "--out", str(outs[-1]))
        assert code == 0, err
    frames = [pd.read_csv(o / "predictions.csv") for o in outs]
    for f in frames[1:]:
        pd.testing.assert_frame_equal(frames[0], f)  # the last step's checkpoint holds the final weights
    assert json.loads((outs[0] / "summary.json").read_text())["task"]["way"] == 3


def test_class_names_instead_of_wnids(ooc, tmp_path, capsys):
    """Folders named by an OOC class (its folder or name in the set's class table) or an ILSVRC-2012
    class name map without a label map."""
    run, _ = finetuned(tmp_path, {"tiger": "Tiger", "zebra": "zebra", "teddy_bear": "teddy"},
                       steps=("1", "1", "1", "1", "2"))
    code, out, err = _evaluate(capsys, "--model", str(run), "--data", str(ooc), "--out", str(tmp_path / "ev"))
    assert code == 0, err
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert dict(s["model"]["head"]["classes"]) == {"Tiger": ["n02129604"], "zebra": ["n02391049"],
                                                   "teddy": ["n04399382"]}  # table name, table folder, ILSVRC name
    assert s["n"] == 36 and s["task"]["note"] == NOTE


def test_a_class_that_maps_to_nothing_is_named_and_a_label_map_still_works(ooc, tmp_path, capsys):
    run, _ = finetuned(tmp_path, {"tiger": "tiger", "zebra": "zebra", "teddy_bear": "giraffe_xyz"},
                       steps=("1", "1", "1", "1", "2"))
    out = tmp_path / "ev"
    code, _, err = _evaluate(capsys, "--model", str(run), "--data", str(ooc), "--out", str(out))
    assert code == 2 and "Traceback" not in err
    assert f"{run / 'final.pt'}: the run's classes: 'giraffe_xyz' maps to no ILSVRC-2012 class" in err
    assert "--label-map FILE (one ILSVRC-2012 wnid or '-' per output, 3 lines in head order)" in err
    assert not out.exists()
    # The escape hatch: a label map (here one that leaves the third output out, so 2 classes are scored).
    (tmp_path / "map.txt").write_text("-\nn02129604\nn02391049\n")  # head order: giraffe_xyz, tiger, zebra
    code, _, err = _evaluate(capsys, "--model", str(run), "--label-map", str(tmp_path / "map.txt"), "--data", str(ooc),
                             "--out", str(out))
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == {"way": 2, "subset": True, "note": "2-way head: an easier task than the paper's 1000-way "
                         "models", "images_left_out": 84,
                         "classes_left_out": ["lighthouse", "ostrich", "penguin", "sea_lion", "tank", "teddy_bear"]}
    assert s["n"] == 24 and set(s["per_class"]) == {"tiger", "zebra"}


def test_an_unfinished_run_says_how_to_go_on(ooc, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    code, _, err = _evaluate(capsys, "--model", str(run), "--data", str(ooc), "--out", str(tmp_path / "ev"))
    assert code == 2 and f"{run}: no final.pt (the run has not finished: resume it, or evaluate its last checkpoint " \
                          f"with --pretrained {run / 'checkpoint.pt'})" in err


def test_help_describes_the_run_directory_form_and_subset_scoring(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0
    # argparse wraps lines, also after a word's hyphen ("class-\ntable")
    text = " ".join(capsys.readouterr().out.replace("-\n", "-").split())
    for part in ("a `bitlab finetune`/`pretrain` run directory (--model RUN_DIR)", "class names, which map to "
                 "ILSVRC-2012 by wnid, ILSVRC class name or class-table folder/alias", "A head over a subset of the "
                 "1000 classes is scored over its own classes", "an easier task than the paper's 1000-way models",
                 "--random-init"):
        assert part in text, part


def test_a_run_evaluated_together_with_a_1000_way_model_is_scored_as_alone(wnid_run, ooc, tmp_path, capsys):
    """One pass for a 3-way run and Lite0: the run is scored on its classes' images only, as a
    separate evaluate scores it, and Lite0 on all of them."""
    run, _ = wnid_run
    lite0, folder = zoo.OFFLINE_IMAGENET_MODEL, f"R14x0.5-{run.name}"
    code, out, err = _evaluate(capsys, "--model", str(run), "--model", lite0, "--data", str(ooc),
                               "--out", str(tmp_path / "both"))
    assert code == 0, err
    code, _, err = _evaluate(capsys, "--model", str(run), "--data", str(ooc), "--out", str(tmp_path / "alone"))
    assert code == 0, err
    together, alone = load_results(tmp_path / "both" / folder), load_results(tmp_path / "alone")
    assert list(together.predictions["image"]) == list(alone.predictions["image"])
    assert (together.predictions["top1_id"] == alone.predictions["top1_id"]).all()
    assert together.summary["task"] == alone.summary["task"] and together.summary["n"] == alone.summary["n"] == 36
    assert set(together.predictions["class"]) == {"tiger", "zebra", "teddy_bear"}
    assert load_results(tmp_path / "both" / lite0).summary["n"] == 108
