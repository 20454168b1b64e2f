"""The reader of `bitlab evaluate`'s results folder, beside its writer: what evaluate wrote comes back,
old relative data paths are found, broken, cut-short or mixed folders are refused naming the file and
field, a folder being written is refused; figures import eval, never the reverse."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import bitlab
from bitlab.errors import BitlabError
from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.eval.results import CONFIG, PREDICTIONS, SUMMARY, Results, load_results
from tests.fixtures.processes import ENV


@pytest.fixture(scope="module")
def written(tiny_ooc, tmp_path_factory) -> tuple[Path, dict]:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("results") / "tiny"
    summary = evaluate(EvaluateConfig(model="R14x0.5", random_init=True, data=str(tiny_ooc), out=str(out),
                                      image_size=32, topk=3, label="tiny (random)", workers=0, progress=False))
    return out, summary


def test_what_evaluate_writes_reads_back(written, tiny_ooc):
    out, summary = written
    r = load_results(out)
    assert isinstance(r, Results) and r.summary == json.loads(json.dumps(summary))  # tuples come back as lists
    assert r.config == json.loads((out / CONFIG).read_text()) and r.config["model"] == "R14x0.5"
    assert (r.label, r.role, r.k, r.has_backgrounds) == ("tiny (random)", "ooc", 3, True)
    assert len(r.predictions) == summary["n"] == len(pd.read_csv(out / PREDICTIONS))
    assert r.predictions["image"].map(lambda image: isinstance(image, str)).all()  # never parsed as numbers
    assert r.data_root == tiny_ooc


def test_results_find_their_data_from_another_directory(written, tmp_path, monkeypatch):
    """Results store the data folder absolute; older ones, relative to where `evaluate` ran, are found
    beside the results folder's parents (a notebook in notebooks/ reading ../demo_out/results/...)."""
    out, _ = written
    real = load_results(out)
    assert Path(real.summary["dataset"]["path"]).is_absolute()
    work = tmp_path / "work"
    shutil.copytree(real.data_root, work / "demo_out" / "ooc")
    shutil.copytree(out, work / "demo_out" / "results" / "real")
    summary = work / "demo_out" / "results" / "real" / SUMMARY
    old = json.loads(summary.read_text())
    old["dataset"]["path"] = "demo_out/ooc"  # as `bitlab evaluate --data demo_out/ooc` run in work/ wrote it
    summary.write_text(json.dumps(old))
    (work / "notebooks").mkdir()
    monkeypatch.chdir(work / "notebooks")
    moved = load_results("../demo_out/results/real")
    assert moved.data_root.resolve() == (work / "demo_out" / "ooc").resolve()
    assert (moved.data_root / moved.predictions["image"][0]).is_file()
    shutil.rmtree(work / "demo_out" / "ooc")
    with pytest.raises(BitlabError, match=r"real/summary.json: dataset.path 'demo_out/ooc' not found \(neither "
                                          r"from .*notebooks nor beside the parents of \.\./demo_out/results/real\)"):
        load_results("../demo_out/results/real").data_root


def test_broken_results_folders_are_named(written, tmp_path):
    out, _ = written
    with pytest.raises(BitlabError, match="nowhere: results folder not found"):
        load_results(tmp_path / "nowhere")
    for name, damage, message in ((CONFIG, None, "config.json: missing results file"),
                                  (SUMMARY, "{not json", "unreadable results file"),
                                  (PREDICTIONS, "image,class\n", "predictions.csv: no predictions")):
        broken = tmp_path / name
        shutil.copytree(out, broken)
        if damage is None:
            (broken / name).unlink()
        else:
            (broken / name).write_text(damage)
        with pytest.raises(BitlabError, match=message):
            load_results(broken)


def test_nothing_in_eval_imports_the_figures():
    """Data flows one way: `bitlab.report` draws from `bitlab.eval`, so no eval module imports it."""
    offenders = []
    for path in sorted((Path(bitlab.__file__).parent / "eval").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "bitlab.report" or n.startswith("bitlab.report.")]
    assert offenders == []


def _set_cell(text: str, row: int, column: str, value: str) -> str:
    lines = text.splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    cells = lines[row].rstrip("\n").split(",")  # these rows have no quoted commas
    cells[header.index(column)] = value
    lines[row] = ",".join(cells) + "\n"
    return "".join(lines)


def _damaged(out: Path, tmp_path: Path, name: str, damage) -> Path:
    broken = tmp_path / f"broken_{len(list(tmp_path.iterdir()))}"
    shutil.copytree(out, broken)
    (broken / name).write_text(damage((out / name).read_text()))
    return broken


@pytest.mark.parametrize("name, damage, message", [
    # cut inside the last row: its cells are empty, not numbers (was: TypeError in 'mean')
    (PREDICTIONS, lambda t: t[: t.rindex("\n", 0, -1) + 40], r"predictions.csv: line 13, column '.*' is '', not "),
    # cut after a whole row: fewer rows than the summary counts
    (PREDICTIONS, lambda t: "".join(t.splitlines(keepends=True)[:8]), r"predictions.csv: 7 rows, but .*summary.json "
                                                                       r"field 'n' is 12"),
    (PREDICTIONS, lambda t: t.replace("top1_prob", "top1_p"), r"predictions.csv: missing column\(s\) top1_prob"),
    (PREDICTIONS, lambda t: _set_cell(t, 3, "top1_correct", "yes"), r"line 4, column 'top1_correct' is 'yes', not "
                                                                    "True or False"),
    (PREDICTIONS, lambda t: _set_cell(t, 5, "top2_id", "2.5"), r"line 6, column 'top2_id' is '2.5', not an integer"),
    (PREDICTIONS, lambda t: "", r"predictions.csv: no predictions \(the file is empty\)"),
    (SUMMARY, lambda t: '{"model": {}}', r"summary.json: field 'model.label' is missing"),  # was: KeyError 'dataset'
    (SUMMARY, lambda t: "[1, 2]", r"summary.json: unreadable results file: a JSON object was expected"),
    (SUMMARY, lambda t: t.replace('"n": 12', '"n": "12"'), r"summary.json: field 'n' is '12', not a int"),
    (SUMMARY, lambda t: t.replace('"role": "ooc"', '"role": "test"'), r"field 'dataset.role' is 'test'"),
    (CONFIG, lambda t: t.replace('"model": "R14x0.5"', '"model": "R50x1"'),
     r"config.json: field 'model' is 'R50x1', but .*summary.json field 'model.name' is 'R14x0.5': the files come "
     "from two runs"),
])
def test_damaged_or_mixed_folders_are_refused_naming_file_and_field(written, tmp_path, name, damage, message):
    out, _ = written
    with pytest.raises(BitlabError, match=message):
        load_results(_damaged(out, tmp_path, name, damage))


def test_a_folder_being_written_is_refused(written, tmp_path):
    """While `evaluate` holds the folder (here a real process holding its lock), readers wait for it."""
    out, _ = written
    busy = tmp_path / "busy"
    shutil.copytree(out, busy)
    hold = ("import sys, time\nfrom bitlab import fileio\nwith fileio.lock_folder(sys.argv[1], 'evaluate'):\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(busy)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(BitlabError, match=f"busy is in use by pid {proc.pid} .*bitlab evaluate"):
            load_results(busy)
    finally:
        proc.kill()
        proc.wait()
    assert len(load_results(busy).predictions) == 12  # its lock file left behind is no obstacle
