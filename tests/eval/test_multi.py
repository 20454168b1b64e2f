"""Several models in one pass with the real offline ImageNet models: the same results as separate runs,
each file decoded once, resumable per model, and under torchrun (2 Gloo processes) one result equal
to a single-process run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from bitlab.cli import main
from bitlab.data import loader
from bitlab.data.transforms import decode_image, eval_image, normalize, to_chw_tensor
from bitlab.errors import BitlabError
from bitlab.eval import multi, predict
from bitlab.eval.evaluate import EvaluateConfig, evaluate, evaluate_models, read_models_file
from bitlab.eval.results import find_results, load_results
from bitlab.models import create_model, zoo
from bitlab.ooc.build import build_demo
from tests.fixtures import numerics
from tests.fixtures.processes import torchrun

LITE0, LITE2 = "efficientnet_lite0.offline_in1k", "efficientnet_lite2.offline_in1k"
# A second model that costs little: its own view (64 px, bilinear, squash) beside Lite0's 224 px bicubic.
TINY = {"model": "R14x0.5", "random_init": True, "image_size": 64, "label": "tiny (random)"}


@pytest.fixture(scope="module")
def ooc(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("multi") / "ooc")


@pytest.fixture(scope="module")
def together(ooc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("together") / "res"
    evaluate_models(EvaluateConfig(model=LITE0, data=str(ooc), out=str(out), batch_size=8, progress=False),
                    [{"model": LITE0}, TINY])
    return out


def test_models_together_write_what_separate_runs_write(ooc, together, tmp_path):
    """Lite0 (224 px) and a tiny random model (64 px) in one pass: each model's tables are those of
    its own run, value for value (the same uint8 inputs, batches and kernels)."""
    index = json.loads((together / "models.json").read_text())
    assert index["models"] == [{"label": LITE0, "folder": LITE0, "model": LITE0},
                               {"label": "tiny (random)", "folder": "tiny-random", "model": "R14x0.5"}]
    for spec, folder in (({"model": LITE0}, LITE0), (TINY, "tiny-random")):
        alone = tmp_path / folder
        evaluate(EvaluateConfig(data=str(ooc), out=str(alone), batch_size=8, progress=False, **spec))
        for table in ("predictions.csv", "variant_predictions.csv"):
            pd.testing.assert_frame_equal(pd.read_csv(together / folder / table), pd.read_csv(alone / table))
        a, b = (json.loads((d / "summary.json").read_text()) for d in (together / folder, alone))
        assert a == b
    assert [r.label for r in find_results([together])] == [LITE0, "tiny (random)"]
    with pytest.raises(BitlabError, match="models.json"):
        load_results(together)


def test_each_file_is_decoded_once_for_every_model(ooc, tmp_path, monkeypatch):
    seen, views = [], []
    real_decode, real_view = loader.decode_image, predict.eval_image

    def spy_decode(path, min_side=None):
        seen.append(Path(path).name)
        return real_decode(path, min_side)

    def spy_view(img, cfg):
        views.append(predict.view_key(cfg))
        return real_view(img, cfg)

    monkeypatch.setattr(loader, "decode_image", spy_decode)
    monkeypatch.setattr(predict, "eval_image", spy_view)
    models = [create_model(LITE0), create_model(LITE2), create_model(LITE0)]
    paths = sorted(ooc.glob("*/*.png"))[::4]  # every class, a quarter of the images: the order is what counts
    batches = list(predict.iter_probs_many(models, paths, batch_size=5, workers=0, progress=False))
    # Each file once, for all three models (in any order: a batch decodes in threads).
    assert sorted(seen) == sorted(p.name for p in paths)
    sizes = [key[0] for key in views]
    assert sorted(sizes) == [224] * len(paths) + [260] * len(paths)  # one view per distinct evaluation view: two per file
    first = torch.cat([b[0] for b in batches])
    assert torch.equal(first, torch.cat([b[2] for b in batches]))  # the same model, the same view
    assert first.shape == (len(paths), 1000)


def test_an_interrupted_pass_resumes_per_model(ooc, tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(ooc, data)
    monkeypatch.setattr(multi, "CHUNK", 8)
    victim = data / pd.read_csv(data / "manifest.csv")["file"][9]  # in the second chunk
    good = victim.read_bytes()
    victim.write_bytes(b"not an image")
    base = EvaluateConfig(model=LITE0, data=str(data), out=str(tmp_path / "r"), workers=0, progress=False)
    models = [{"model": LITE0}, TINY]
    with pytest.raises(BitlabError, match=f"{victim.name}: cannot decode"):
        evaluate_models(base, models)
    parts = {m: sorted((tmp_path / "r" / m / ".partial").glob("*.npz")) for m in (LITE0, "tiny-random")}
    assert [len(p) for p in parts.values()] == [1, 1]
    parts["tiny-random"][0].unlink()  # as if it had joined later: only it lacks the first chunk
    victim.write_bytes(good)
    calls = []
    real = predict.iter_probs_many

    def spy(models, paths, **kw):
        calls.append((len(models), len(paths)))
        return real(models, paths, **kw)

    monkeypatch.setattr(predict, "iter_probs_many", spy)
    evaluate_models(base, models)
    assert calls[0] == (1, 8) and all(c[0] == 2 for c in calls[1:])
    assert sum(c[1] for c in calls[1:]) == len(load_results(tmp_path / "r" / LITE0).predictions) + \
        len(load_results(tmp_path / "r" / LITE0).variant_predictions) - 8


def test_models_file_and_flags(ooc, tmp_path, capsys):
    spec = tmp_path / "models.yaml"
    spec.write_text(f"- {LITE0}\n- model: R14x0.5\n  random_init: true\n  image_size: 32\n  label: tiny (random)\n")
    assert read_models_file(spec)[1] == {"model": "R14x0.5", "random_init": True, "image_size": 32,
                                         "label": "tiny (random)"}
    out = tmp_path / "res"
    assert main(["evaluate", "--models", str(spec), "--data", str(ooc), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{LITE0} on" in printed and "tiny (random) on" in printed and "models.json" in printed
    assert sorted(p.name for p in out.iterdir()) == [LITE0, "models.json", "tiny-random"]
    assert load_results(out / "tiny-random").summary["model"]["data_config"]["input_size"] == 32
    assert main(["evaluate", "--model", LITE0, "--model", "R14x0.5", "--label", "x", "--data", str(ooc),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--label applies to one model" in capsys.readouterr().err
    spec.write_text("- model: R14x0.5\n  weights: w.npz\n")
    assert main(["evaluate", "--models", str(spec), "--data", str(ooc), "--out", str(tmp_path / "bad")]) == 2
    assert "model 1: unknown setting 'weights'" in capsys.readouterr().err
    assert main(["evaluate", "--model", "R14x0.5", "--model", "R14x0.5", "--data", str(ooc),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "share a label" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_torchrun_shards_the_images_and_rank0_writes_the_single_process_result(ooc, tmp_path):
    spec = tmp_path / "models.yaml"
    spec.write_text(f"- {LITE0}\n- model: R14x0.5\n  random_init: true\n  image_size: 48\n")  # seeded alike
    single, out = tmp_path / "single", tmp_path / "dist"
    assert main(["evaluate", "--models", str(spec), "--data", str(ooc), "--out", str(single), "--batch-size", "4",
                 "--workers", "0", "--no-progress"]) == 0
    proc = torchrun(["-m", "bitlab", "evaluate", "--models", str(spec), "--data", str(ooc), "--out", str(out),
                     "--batch-size", "4", "--workers", "0", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"{LITE0} on") == 1  # one process speaks
    tol = numerics.MARGIN * _batch_floor(create_model(LITE0).eval(), ooc)
    for folder in (LITE0, "R14x0.5-random-weights"):
        a, b = load_results(single / folder), load_results(out / folder)
        for table in ("predictions", "variant_predictions"):
            _assert_same_topk(getattr(a, table), getattr(b, table), tol)
        sa, sb = a.summary, b.summary
        assert (sa["n"], sa["top1"], sa["top5"], sa["per_background"]) == (sb["n"], sb["top1"], sb["top5"],
                                                                            sb["per_background"])
        assert sa["context"]["background_gap"] == sb["context"]["background_gap"]
    assert json.loads((out / "models.json").read_text()) == json.loads((single / "models.json").read_text())


def _batch_floor(model: torch.nn.Module, ooc: Path) -> float:
    """How far the same images land in another batch composition on this machine (batch of 8 vs one
    at a time): the noise between a run's shards and a single process's batches."""
    cfg = model.data_config
    x = torch.cat([normalize(to_chw_tensor(eval_image(decode_image(p), cfg))[None], cfg.mean, cfg.std)
                   for p in sorted(ooc.glob("*/*.png"))[:8]])
    with torch.no_grad():
        together = model(x).softmax(-1)
        alone = torch.cat([model(x[i:i + 1]).softmax(-1) for i in range(len(x))])
    return max((together - alone).abs().max().item(), numerics.ULPS * numerics.F32_EPS)


def _assert_same_topk(a: pd.DataFrame, b: pd.DataFrame, tol: float) -> None:
    """The same images in order; each top-k class at the same rank unless its neighbour ties within
    `tol`; the probability of every class in both within `tol`."""
    assert a["image"].tolist() == b["image"].tolist()
    k = max(int(c[3:-3]) for c in a if c.startswith("top") and c.endswith("_id"))
    ids = [f"top{j}_id" for j in range(1, k + 1)]
    probs = [f"top{j}_prob" for j in range(1, k + 1)]
    for (ia, pa), (ib, pb) in zip(zip(a[ids].to_numpy(), a[probs].to_numpy()), zip(b[ids].to_numpy(), b[probs].to_numpy())):
        for j in range(k):
            if ia[j] != ib[j]:  # only a tie may swap
                near = [pa[i] for i in (j - 1, j + 1) if 0 <= i < k]
                assert min(abs(pa[j] - v) for v in near) <= 2 * tol, (ia, ib, pa)
        common = {c: p for c, p in zip(ia, pa)}
        for c, p in zip(ib, pb):
            if c in common:
                assert abs(common[c] - p) <= tol, (c, common[c], p, tol)
