"""The reader of `bitlab evaluate`'s results folder, beside its writer: what evaluate wrote comes back,
old relative data paths are found, broken folders are named; figures import eval, never the reverse."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

import bitlab
from bitlab.errors import BitlabError
from bitlab.eval.evaluate import EvaluateConfig, evaluate
from bitlab.eval.results import CONFIG, PREDICTIONS, SUMMARY, Results, load_results


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
