"""Which mistakes fit the background: the bare backgrounds of a make-ooc build, a real model's view
of them, and the per-image test."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bitlab.data import imagenet
from bitlab.errors import BitlabError
from bitlab.eval import context
from bitlab.ooc import compose
from bitlab.ooc.build import build_demo
from bitlab.paths import SAMPLE_DIR


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("ooc") / "ooc", size=224)


def test_background_squares_are_the_composited_crops(sample_build, tmp_path):
    squares = context.background_squares(sample_build, tmp_path / "bare")
    table = pd.read_csv(SAMPLE_DIR / "backgrounds" / "backgrounds.csv")
    assert sorted(squares) == sorted(table["uid"]) and len(squares) == 12
    for row in table.itertuples():
        want = compose.prepare_background(compose.decode(SAMPLE_DIR / "backgrounds" / row.file), 224)
        assert np.array_equal(compose.decode(squares[row.uid]), want)  # PNG: the very pixels behind the object
    # A composite holds the same background outside the object.
    manifest = pd.read_csv(sample_build / "manifest.csv")
    r = manifest.iloc[0]
    img, bare = compose.decode(sample_build / r["file"]), compose.decode(squares[r["bg_uid"]])
    x0, y0, x1, y1 = map(int, r["fg_bbox_out"].split(","))
    outside = np.ones(img.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(img[outside], bare[outside])


def test_background_squares_name_a_moved_folder(sample_build, tmp_path):
    moved = tmp_path / "ooc"
    moved.mkdir()
    for name in ("manifest.csv", "dataset.json"):
        (moved / name).write_bytes((sample_build / name).read_bytes())
    meta = json.loads((moved / "dataset.json").read_text())
    meta["config"]["backgrounds"] = str(tmp_path / "gone")
    (moved / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(BitlabError, match=r"gone/beach/ocean_waves\.jpg: background beach_ocean_waves of .* not found"):
        context.background_squares(moved, tmp_path / "bare")
    assert len(context.background_squares(moved, tmp_path / "bare", backgrounds=SAMPLE_DIR / "backgrounds")) == 12
    (moved / "dataset.json").write_text("{}")
    with pytest.raises(BitlabError, match="dataset.json: not a make-ooc build"):
        context.background_squares(moved, tmp_path / "bare")


def test_a_real_model_sees_the_sea_in_the_ocean(sample_build, tmp_path):
    from bitlab.models import create_model

    squares = context.background_squares(sample_build, tmp_path / "bare")
    top = context.background_topk(create_model("efficientnet_lite0.offline_in1k"), squares)
    names = {uid: [imagenet.names()[i] for i in ids] for uid, ids in top.items()}
    assert all(len(v) == context.TOPK for v in names.values())
    assert "grey whale" in names["beach_ocean_waves"]  # where a sea lion on the ocean becomes a whale
    assert "coral reef" in names["underwater_reef"] or "brain coral" in names["underwater_reef"]


def test_fits_background_is_a_wrong_top1_among_the_bare_top_k():
    df = pd.DataFrame({"image": list("abcde"), "bg_uid": ["sea", "sea", "sea", "road", ""],
                       "top1_id": [147, 150, 7, 147, 147], "top1_correct": [False, True, False, False, False]})
    got = context.fits_background(df, {"sea": [147, 150, 3], "road": [8]})
    # a: wrong, whale seen in the sea; b: right (not a mistake); c: wrong, not seen there;
    # d: whale not seen on the road; e: no background recorded
    assert got.tolist() == [True, False, False, False, False] and got.name == "fits_background"
