"""Near-duplicate search: blocked top-k against brute force, the planted-duplicate acceptance test
through `bitlab dedup`, Table 6 counts, errors, the embedding cache and planted copies (the Fig. 9
gallery's own tests are in tests/test_report.py)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bitlab.cli import main
from bitlab.errors import BitlabError
from bitlab.eval import dedup
from bitlab.paths import SAMPLE_DIR

# ----------------------------------------------------------------------------- real photos
# Originals that get planted copies downstream, and unrelated photos on either side. All are real
# photos shipped with scikit-image / matplotlib (CC0 or public domain); skimage's `cat` is
# `chelsea`, so it is left out. moon (upstream) vs. cell (downstream) is the closest unrelated
# pair under the default model, the hardest negative; the JPEG copy of the grey clock is the
# hardest planted copy.
PLANTED = ["chelsea", "coffee", "rocket", "astronaut", "camera", "coins", "moon", "hubble_deep_field", "grace_hopper",
           "clock"]
UPSTREAM_ONLY = ["retina", "brick", "grass", "immunohistochemistry"]
DOWNSTREAM_ONLY = ["gravel", "text", "cell", "page", "motorcycle_left"]


def _load(name: str) -> np.ndarray:
    import matplotlib.cbook
    import skimage.data
    import skimage.io

    if name == "grace_hopper":
        img = skimage.io.imread(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    elif name == "motorcycle_left":
        img = skimage.io.imread(Path(skimage.data.__file__).parent / "motorcycle_left.png")
    else:
        img = getattr(skimage.data, name)()
    return np.stack([img] * 3, axis=-1) if img.ndim == 2 else np.ascontiguousarray(img[..., :3])


def _write(path: Path, rgb: np.ndarray, jpeg_quality: int | None = None) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if jpeg_quality else []
    ok, buf = cv2.imencode(path.suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _half(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)


def _crop(img: np.ndarray, frac: float = 0.06) -> np.ndarray:
    h, w = img.shape[:2]
    return img[int(h * frac):h - int(h * frac), int(w * frac):w - int(w * frac)]


# The planted near-duplicates: (suffix, transform, JPEG quality). Quality 30 is well below the
# 75-95 of everyday JPEGs; a 6 % cut from every side keeps 77 % of the pixels.
VARIANTS = {"half": (".png", _half, None), "jpeg30": (".jpg", lambda a: a, 30), "crop": (".png", _crop, None)}


@pytest.fixture(scope="module")
def sets(tmp_path_factory, photos) -> dict:
    """upstream/ (originals + unrelated, sub-folders), downstream/ (planted copies + unrelated),
    and the truth: query name -> upstream name of its original."""
    root = tmp_path_factory.mktemp("dedup_sets")
    originals = {n: photos[n] if n in photos else _load(n) for n in PLANTED}
    truth = {}
    for i, name in enumerate(PLANTED):
        # Two sub-folders: listing is recursive and names are relative paths.
        _write(root / "upstream" / f"part{i % 2}" / f"{name}.png", originals[name])
        for v, (suffix, fn, q) in VARIANTS.items():
            _write(root / "downstream" / f"{name}_{v}{suffix}", fn(originals[name]), q)
            truth[f"{name}_{v}{suffix}"] = f"part{i % 2}/{name}.png"
    for name in UPSTREAM_ONLY:
        _write(root / "upstream" / "part2" / f"{name}.png", _load(name))
    for name in DOWNSTREAM_ONLY:
        _write(root / "downstream" / f"{name}.png", _load(name))
    return {"root": root, "up": root / "upstream", "down": root / "downstream", "truth": truth,
            "unrelated": [f"{n}.png" for n in DOWNSTREAM_ONLY]}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def model_run(sets, tmp_path_factory) -> dict:
    """`bitlab dedup` with the default (real ImageNet) embedding, tiny blocks, and predictions."""
    out = tmp_path_factory.mktemp("dedup_model")
    names = sorted(p.name for p in sets["down"].iterdir())
    # Correctness chosen so that Full and Dedup differ: every planted copy right, unrelated 2 of 5.
    correct = {n: (n in sets["truth"]) or n in sets["unrelated"][:2] for n in names}
    preds = out / "predictions.csv"
    preds.write_text("image,correct\n" + "".join(f"{n},{int(c)}\n" for n, c in correct.items()))
    # block 2 / query block 3: the 14 upstream images span 7 blocks, so most matches are found
    # in a later block than the first and must survive the running top-k merges.
    rc = main(["dedup", "--upstream", str(sets["up"]), "--downstream", str(sets["down"]), "--out", str(out / "run"),
               "--block-size", "2", "--query-block-size", "3", "--topk", "3", "--workers", "0",
               "--predictions", str(preds)])
    assert rc == 0
    return {"out": out / "run", "correct": correct}


# ----------------------------------------------------------------------------- acceptance
def test_cli_finds_every_planted_near_duplicate_and_no_unrelated_photo(sets, model_run):
    out = model_run["out"]
    dups = _rows(out / "duplicates.csv")
    found = {r["query"]: r["match"] for r in dups if r["rank"] == "1"}
    assert found == sets["truth"], "missed or wrong matches"
    # No second-rank pair passes either: every other upstream photo is unrelated to the query.
    assert all(r["rank"] == "1" for r in dups)
    nearest = {r["query"]: float(r["similarity"]) for r in _rows(out / "nearest.csv")}
    assert len(nearest) == len(sets["truth"]) + len(sets["unrelated"])
    threshold = dedup.DEFAULT_THRESHOLDS["cosine"]
    # The margins the module docstring documents for choosing the threshold.
    planted_floor = min(nearest[q] for q in sets["truth"])
    unrelated_ceiling = max(nearest[q] for q in sets["unrelated"])
    assert planted_floor >= threshold + 0.02, planted_floor
    assert unrelated_ceiling <= threshold - 0.1, unrelated_ceiling


def test_cli_writes_table6_counts_config_and_gallery(sets, model_run):
    out, correct = model_run["out"], model_run["correct"]
    summary = json.loads((out / "summary.json").read_text())
    n_dup = len(sets["truth"])
    dedup_correct = [correct[n] for n in sets["unrelated"]]
    assert summary["dups"] == n_dup
    assert summary["full_images"] == n_dup + len(sets["unrelated"])
    assert summary["full"] == pytest.approx(100 * sum(correct.values()) / len(correct), abs=1e-3)
    assert summary["dedup"] == pytest.approx(100 * sum(dedup_correct) / len(dedup_correct), abs=1e-3)
    assert summary["pairs_compared"] == summary["full_images"] * (len(PLANTED) + len(UPSTREAM_ONLY))
    config = json.loads((out / "config.json").read_text())
    assert config["block_size"] == 2 and config["threshold"] == dedup.DEFAULT_THRESHOLDS["cosine"]
    img = cv2.imread(str(out / "duplicates.png"))
    assert img is not None and img.shape[0] > 200 and img.std() > 20  # a real picture, not blank


def test_phash_finds_resized_and_reencoded_copies(sets, tmp_path):
    """The cheap alternative: resized and JPEG copies are caught at the default Hamming threshold;
    crops are not its job (the docstring says so), so only the other two are planted here."""
    down = tmp_path / "down"
    down.mkdir()
    truth = {}
    for q, m in sets["truth"].items():
        if "_crop" not in q:
            (down / q).write_bytes((sets["down"] / q).read_bytes())
            truth[q] = m
    for n in sets["unrelated"]:
        (down / n).write_bytes((sets["down"] / n).read_bytes())
    result = dedup.run_dedup(dedup.DedupConfig(upstream=str(sets["up"]), downstream=str(down), out=str(tmp_path / "o"),
                                               embedding="phash", block_size=3, query_block_size=2, workers=0,
                                               progress=False))
    assert {r["query"]: r["match"] for r in result.duplicates if r["rank"] == 1} == truth
    hamming = {r["query"]: r["distance"] for r in result.nearest}
    assert max(hamming[q] for q in truth) <= 6  # documented: resized / JPEG copies differ in <= 6 bits
    assert min(hamming[q] for q in sets["unrelated"]) >= 20  # documented: unrelated photos in >= 20
    assert result.summary["metric"] == "hamming" and result.summary["dims"] == 64
    # The gallery's pairs: each planted copy's file beside its original's file.
    assert {(q.name, m.relative_to(sets["up"]).as_posix()) for q, m, _ in result.pairs()} == set(truth.items())


def test_offline_sample_holds_a_resized_skimage_photo(tmp_path, photos):
    """The embedded sample's Hubble background is scikit-image's photo, resized and re-encoded:
    found from a list file, across the sample's folders; its other photos match nothing."""
    import skimage.data

    up = tmp_path / "up"
    _write(up / "hubble.png", skimage.data.hubble_deep_field())
    for name in ("chelsea", "coffee", "rocket"):
        _write(up / f"{name}.png", photos[name])
    listing = tmp_path / "upstream.txt"
    listing.write_text("# originals\nup/hubble.png\n\nup/chelsea.png\nup/coffee.png\nup/rocket.png\n")
    result = dedup.run_dedup(dedup.DedupConfig(upstream=str(listing), downstream=str(SAMPLE_DIR),
                                               out=str(tmp_path / "o"), workers=0, progress=False, ))
    found = {Path(r["query"]).name: r["match"] for r in result.duplicates}
    assert found == {"hubble_deep_field.jpg": "up/hubble.png"}
    assert result.summary["downstream_images"] == 9 + 9 + 12  # the sample's photos, masks and backgrounds
    assert not (tmp_path / "o" / "duplicates.png").exists()


# ----------------------------------------------------------------------------- search
def _brute_force(q: np.ndarray, u: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ u.T
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, axis=1), idx


@pytest.mark.parametrize("block_size,query_block_size,k", [(7, 3, 4), (1, 1, 1), (50, 64, 5), (13, 5, 12)])
def test_blocked_search_equals_brute_force(block_size, query_block_size, k):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((23, 16)).astype(np.float32)
    u = rng.standard_normal((50, 16)).astype(np.float32)
    values, indices = dedup.search(q, u, k=k, block_size=block_size, query_block_size=query_block_size)
    ref_values, ref_indices = _brute_force(q, u, k)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-5)


def test_topk_larger_than_upstream_pads_with_no_match():
    values, indices = dedup.search(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)[:2], k=4, block_size=1)
    assert indices[0].tolist() == [0, 1, -1, -1] and np.isinf(values[:, 2:]).all()


def test_search_rejects_mismatched_embedding_dims():
    blocks = [(0, torch.zeros(4, 8)), (4, torch.zeros(4, 6))]
    with pytest.raises(BitlabError, match="embedding dims differ: downstream queries have 8 dims, the upstream "
                                          r"block at image 4 has shape \(4, 6\)"):
        dedup.search_blocks(torch.zeros(2, 8), blocks)


def test_hashes_as_signed_vectors_give_hamming_distances_by_matmul(photos):
    hashes = np.stack([dedup.phash_bits(img) for img in photos.values()])
    signed = torch.stack([dedup.phash_view(img) for img in photos.values()]).float()
    emb = dedup.PHashEmbedding()
    _, dist = emb.similarity_distance((signed @ signed.T).numpy(), 64)
    np.testing.assert_array_equal(dist, (hashes[:, None] != hashes[None]).sum(-1))
    assert dist.max() > 16  # different photos really differ


def test_model_embedding_is_normalised_pre_logits():
    torch.manual_seed(0)
    emb = dedup.make_embedding("model:R14x0.5", random_init=True)
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    e = emb.embed(x)
    assert e.shape == (3, emb.model.num_features)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    with torch.inference_mode():
        raw = emb.model.pre_logits((x.float() / 255 - 0.5) / 0.5)
    torch.testing.assert_close(e, torch.nn.functional.normalize(raw, dim=1))


def test_model_embeddings_are_pretrained_unless_random_init_is_asked_for():
    with pytest.raises(BitlabError, match="R14x0.5 names an architecture, and no weights were released"):
        dedup.make_embedding("model:R14x0.5")
    with pytest.raises(BitlabError, match="random_init applies to model embeddings, not phash"):
        dedup.make_embedding("phash", random_init=True)
    with pytest.raises(BitlabError, match="--random-init asks for random weights, but --weights w.npz gives a file"):
        dedup.make_embedding("model:R14x0.5", "w.npz", random_init=True)
    one, two = (dedup.make_embedding("model:R14x0.5", random_init=True) for _ in range(2))
    assert one.cache_key() == two.cache_key()  # seed 0: the same random weights, so cached embeddings stay valid
    assert all(torch.equal(a, b) for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values()))


def test_model_without_pooled_pre_logits_is_rejected():
    emb = dedup.make_embedding("model:resnet18", random_init=True)
    emb.model.reset_classifier(0, global_pool="")  # timm: features stay (N, C, h, w)
    with pytest.raises(BitlabError, match=r"pre-logits have shape \(1, 512, 2, 2\), expected \(N, D\)"):
        emb.embed(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


# ----------------------------------------------------------------------------- Table 6
def test_table6_is_laid_out_downstream_by_upstream():
    summaries = {("JFT", "CIFAR-10"): {"full": 99.4, "dedup": 99.3, "dups": 435},
                 ("ILSVRC-2012", "CIFAR-10"): {"full": 97.2, "dedup": 97.2, "dups": 82},
                 ("JFT", "Pets"): {"full": 96.8, "dedup": 96.4, "dups": 600}}
    table = dedup.table6(summaries)
    assert table.index.tolist() == ["CIFAR-10", "Pets"]
    assert table.columns.tolist() == [("JFT", "Full"), ("JFT", "Dedup"), ("JFT", "Dups"), ("ILSVRC-2012", "Full"),
                                      ("ILSVRC-2012", "Dedup"), ("ILSVRC-2012", "Dups")]
    assert table.loc["Pets", ("JFT", "Dedup")] == 96.4 and np.isnan(table.loc["Pets", ("ILSVRC-2012", "Full")])
    counts = dedup.table6({("up", "down"): {"full_images": 5, "dedup_images": 3, "dups": 2}})
    assert counts.columns.tolist() == [("up", "Full images"), ("up", "Dedup images"), ("up", "Dups")]


def test_table6_counts():
    is_dup = np.array([True, False, False, True, False])
    correct = np.array([False, True, True, True, False])
    assert dedup.table6_counts(is_dup, correct) == {"dups": 2, "full_images": 5, "dedup_images": 3,
                                                   "full": 60.0, "dedup": pytest.approx(100 * 2 / 3, abs=1e-4)}
    assert dedup.table6_counts(is_dup) == {"dups": 2, "full_images": 5, "dedup_images": 3}


def test_read_predictions_matches_names_and_bare_file_names(tmp_path):
    images = dedup.ImageFiles("test", [Path("a/x.jpg"), Path("b/y.jpg")], ["a/x.jpg", "b/y.jpg"])
    p = tmp_path / "p.csv"
    p.write_text("image,correct,label\ny.jpg,true,3\na/x.jpg,0,1\n")
    assert dedup.read_predictions(p, images).tolist() == [False, True]
    p.write_text("image,top1_correct\nb/y.jpg,False\nx.jpg,yes\n")
    assert dedup.read_predictions(p, images, column="top1_correct").tolist() == [True, False]


@pytest.mark.parametrize("text,message", [
    ("image,label\nx.jpg,1\n", "missing column.* correct"),
    ("image,correct\nx.jpg,1\nz.jpg,1\n", r"p.csv:3: image 'z.jpg' is not in the downstream set"),
    ("image,correct\nx.jpg,maybe\n", r"p.csv:2: correct='maybe' is not a boolean"),
    ("image,correct\nx.jpg,1\nx.jpg,0\n", r"p.csv:3: image 'x.jpg' appears twice"),
    ("image,correct\nx.jpg,1\n", r"no prediction for 1 downstream image\(s\), e.g. y.jpg"),
])
def test_read_predictions_errors_name_the_row(tmp_path, text, message):
    images = dedup.ImageFiles("test", [Path("x.jpg"), Path("y.jpg")], ["x.jpg", "y.jpg"])
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(BitlabError, match=message):
        dedup.read_predictions(tmp_path / "p.csv", images)


# ----------------------------------------------------------------------------- CLI errors
def _cli(tmp_path, capsys, up, down, *extra) -> tuple[int, str]:
    rc = main(["dedup", "--upstream", str(up), "--downstream", str(down), "--out", str(tmp_path / "out"),
               "--workers", "0", "--embedding", "phash", *extra])
    return rc, capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys, photos):
    empty, good = tmp_path / "empty", tmp_path / "good"
    empty.mkdir()
    _write(good / "cat.png", photos["chelsea"])
    rc, err = _cli(tmp_path, capsys, empty, good)
    assert rc == 2 and f"{empty}: no images in this folder" in err
    rc, err = _cli(tmp_path, capsys, tmp_path / "nope", good)
    assert rc == 2 and "nope: no such folder or image list" in err
    (tmp_path / "list.txt").write_text("good/cat.png\ngood/dog.png\n")
    rc, err = _cli(tmp_path, capsys, tmp_path / "list.txt", good)
    assert rc == 2 and "listed image 'good/dog.png' does not exist" in err
    rc, err = _cli(tmp_path, capsys, good, good, "--threshold", "70")
    assert rc == 2 and "Hamming distance between 64-bit hashes" in err
    rc, err = _cli(tmp_path, capsys, good, good, "--embedding", "clip")
    assert rc == 2 and "unknown embedding 'clip'" in err
    bad = tmp_path / "bad"
    _write(bad / "ok.png", photos["coffee"])
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rc, err = _cli(tmp_path, capsys, bad, good, "--batch-size", "1")
    assert rc == 2 and f"{bad / 'broken.jpg'}: cannot decode image" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "summary.json").exists()  # nothing half-written


def test_unreadable_image_named_from_loader_workers(tmp_path, photos):
    """With worker processes the error still names the file, without a worker traceback."""
    up = tmp_path / "up"
    for i in range(5):
        _write(up / f"{i}.png", photos["rocket"])
    (up / "5.png").write_bytes(b"garbage")
    with pytest.raises(BitlabError) as e:
        dedup.embed_files(dedup.PHashEmbedding(), sorted(up.iterdir()), batch_size=2, workers=2, progress=False)
    assert str(e.value) == f"{up / '5.png'}: cannot decode image (corrupt or not an image)"


def test_cli_default_embedding_is_the_offline_model_without_importing_torch():
    import subprocess
    import sys

    from bitlab.cli import dedup as cli_dedup
    from bitlab.models import zoo

    assert cli_dedup.OFFLINE_IMAGENET_MODEL == zoo.OFFLINE_IMAGENET_MODEL
    code = "import sys; from bitlab.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


# ----------------------------------------------------------------------------- cache / resume
def test_cache_reuses_blocks_and_recomputes_changed_files(tmp_path, photos, monkeypatch):
    up, down = tmp_path / "up", tmp_path / "down"
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        _write(up / f"{name}.png", photos[name])
    _write(down / "q.jpg", photos["coffee"], 40)
    calls = []
    real = dedup.embed_files
    monkeypatch.setattr(dedup, "embed_files",
                        lambda emb, paths, **kw: calls.append(len(paths)) or real(emb, paths, **kw))
    cfg = dedup.DedupConfig(upstream=str(up), downstream=str(down), out=str(tmp_path / "o"), embedding="phash",
                            block_size=2, workers=0, progress=False)
    first = dedup.run_dedup(cfg)
    assert calls == [1, 2, 2]  # downstream, then two upstream blocks
    calls.clear()
    again = dedup.run_dedup(dedup.DedupConfig(**{**cfg.to_dict(), "threshold": 0}))  # a new threshold: search only
    assert calls == [] and again.nearest == first.nearest
    _write(up / "rocket.png", photos["coffee"])  # changes the second block only
    calls.clear()
    third = dedup.run_dedup(cfg)
    assert calls == [2]
    assert {r["match"] for r in third.duplicates} == {"coffee.png", "rocket.png"}


def test_corrupt_cache_file_is_recomputed(tmp_path, photos):
    _write(tmp_path / "up" / "a.png", photos["chelsea"])
    cache = dedup.EmbeddingCache(tmp_path / "cache", dedup.PHashEmbedding())
    paths = [tmp_path / "up" / "a.png"]
    first = cache.get(paths, progress=False)
    (file,) = (tmp_path / "cache").iterdir()
    file.write_bytes(b"not an npy")
    torch.testing.assert_close(cache.get(paths, progress=False), first)
    assert np.load(file, allow_pickle=False).shape == (1, 64)


# ----------------------------------------------------------------------------- planted copies
def test_plant_near_duplicates_writes_each_edit(tmp_path, photos):
    original = tmp_path / "orig" / "chelsea.png"
    _write(original, photos["chelsea"])
    planted = dedup.plant_near_duplicates([original], tmp_path / "copies")
    assert planted == {"chelsea_half.png": (original, "half"), "chelsea_jpeg30.jpg": (original, "jpeg30"),
                       "chelsea_crop.png": (original, "crop")}
    h, w = photos["chelsea"].shape[:2]
    half = cv2.imread(str(tmp_path / "copies" / "chelsea_half.png"))
    crop = cv2.imread(str(tmp_path / "copies" / "chelsea_crop.png"))
    jpeg = cv2.imread(str(tmp_path / "copies" / "chelsea_jpeg30.jpg"))
    assert half.shape[:2] == (h // 2, w // 2)
    assert crop.shape[:2] == (h - 2 * int(h * 0.06), w - 2 * int(w * 0.06))
    assert jpeg.shape[:2] == (h, w)
    assert 2 < np.abs(jpeg.astype(int)[..., ::-1] - photos["chelsea"]).mean() < 20  # lossy, yet the same photo
    with pytest.raises(BitlabError, match="unknown edit 'blur'"):
        dedup.plant_near_duplicates([original], tmp_path / "x", edits=["blur"])
    other = tmp_path / "other" / "chelsea.png"
    _write(other, photos["coffee"])
    with pytest.raises(BitlabError, match="two originals named 'chelsea'"):
        dedup.plant_near_duplicates([original, other], tmp_path / "y")


def test_planted_demo_knows_its_truth(tmp_path):
    ps = dedup.planted_demo(tmp_path)
    up = dedup.list_images(ps.upstream)
    down = dedup.list_images(ps.downstream)
    assert len(up) == len(dedup.DEMO_PLANTED) + len(dedup.DEMO_UPSTREAM_ONLY) + 1  # + the near-miss's twin
    assert sorted(down.names) == sorted([*ps.truth, *ps.unrelated])
    assert "motorcycle_left.png" in up.names and ps.kinds()["motorcycle_right.png"] == "near-miss: another view"
    assert ps.classes["chelsea_half.png"] == dedup.DEMO_CLASSES["chelsea"] and ps.classes["gravel.png"] == ()
    assert set(ps.truth.values()) == {f"{n}.png" for n in dedup.DEMO_PLANTED}
    assert set(ps.truth.values()) <= set(up.names)
    kinds = ps.kinds()
    assert kinds["clock_jpeg30.jpg"] == "JPEG quality-30 copy" and kinds["cell.png"] == "unrelated photo"
    rows = [{"query": "clock_jpeg30.jpg", "match": "clock.png", "rank": 1},  # right
            {"query": "moon_half.png", "match": "moon.png", "rank": 2},  # not a best match: ignored
            {"query": "coffee_crop.png", "match": "chelsea.png", "rank": 1},  # wrong original
            {"query": "cell.png", "match": "moon.png", "rank": 1}]  # unrelated photo flagged
    score = ps.score(rows)
    assert score["found"] == ["clock_jpeg30.jpg"] and score["false"] == ["cell.png", "coffee_crop.png"]
    assert len(score["missed"]) == len(ps.truth) - 2 and "coffee_crop.png" not in score["missed"]
