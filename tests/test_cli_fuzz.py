"""Every CLI verb fed a table of bad inputs, as a hostile user would: wrong encodings, BOMs in the
wrong place, truncated files, headers declaring absurd sizes, absurd numbers. Each must exit 2 with
`bitlab VERB: error:` and a message naming the input (file, line, field or flag), print no
traceback, and leave nothing behind that looks like a finished result."""
from __future__ import annotations

import io as stdio
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest
import torch

from bitlab.cli import main
from bitlab.paths import SAMPLE_DIR
from tests.fixtures.images import png_declaring

# What a finished job leaves: none of these may exist in a failed job's output.
FINISHED = ("summary.json", "dataset.json", "manifest.csv", "predictions.csv", "final.pt", "fewshot_summary.csv",
            "index.json", "duplicates.csv", "fetch.json", "selection.csv")
NON_UTF8 = b"\xff\xfe\x80 not utf-8\n"


@dataclass
class Case:
    """`make(tmp, inputs)` writes the bad input and returns the argv; `names` must all appear in the
    error; `out` is the output path (relative to tmp) that must hold no finished result."""
    verb: str
    what: str
    make: Callable[[Path, dict], list[str]]
    names: tuple[str, ...]
    out: str = "out"


# ------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Real, valid inputs that each case damages one way: the embedded sample, a 64 px make-ooc
    build of it, a model evaluated on that build, a small image-folder data set and a CSV of it."""
    from bitlab.ooc.build import build_demo

    root = tmp_path_factory.mktemp("fuzz_inputs")
    ooc = build_demo(root / "ooc", size=64)
    assert main(["evaluate", "--model", "efficientnet_lite0.offline_in1k", "--data", str(ooc),
                 "--out", str(root / "ev"), "--batch-size", "32", "--workers", "0"]) == 0
    data = root / "folder"
    rng = np.random.default_rng(0)
    lines = ["path,label"]
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(data / c / f"{i}.png"), rng.integers(0, 255, (32, 32, 3), np.uint8))
            lines.append(f"{c}/{i}.png,{c}")
    (data / "data.csv").write_text("\n".join(lines) + "\n")
    return {"ooc": ooc, "ev": root / "ev", "folder": data, "csv": data / "data.csv"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sample_argv(sample: Path, out: Path, **overrides: str) -> list[str]:
    flags = {"--openimages": sample / "openimages", "--backgrounds": sample / "backgrounds",
             "--selection": sample / "selection.csv", "--classes": sample / "classes.csv",
             "--background-categories": sample / "background_categories.csv", **overrides}
    return ["make-ooc", "--out", str(out), "--size", "64", *[str(x) for kv in flags.items() for x in kv]]


def _damaged(src: Path, dst: Path, edit: Callable[[bytes], bytes]) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(edit(src.read_bytes()))
    return dst


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


# --------------------------------------------------------------------------------------- make-ooc
def _ooc_table(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, inputs: dict) -> list[str]:
        bad = _damaged(SAMPLE_DIR / name, tmp / name, edit)
        flag = {"classes.csv": "--classes", "selection.csv": "--selection",
                "background_categories.csv": "--background-categories"}[name]
        return _sample_argv(SAMPLE_DIR, tmp / "out", **{flag: bad})
    return make


def _ooc_file(pattern: str, data: Callable[[Path], bytes]) -> Callable[[Path, dict], list[str]]:
    """Replace the first sample file matching `pattern` (in a copy of the sample) by `data(file)`."""
    def make(tmp: Path, inputs: dict) -> list[str]:
        sample = _copy(SAMPLE_DIR, tmp / "sample")
        victim = sorted(sample.glob(pattern))[0]
        victim.write_bytes(data(victim))
        return _sample_argv(sample, tmp / "out")
    return make


def _unterminated_quote(data: bytes) -> bytes:
    lines = data.decode().splitlines(keepends=True)
    return ("".join(lines[:-1]) + '"' + lines[-1]).encode()


MAKE_OOC = [
    Case("make-ooc", "classes.csv not UTF-8", _ooc_table("classes.csv", lambda b: b + NON_UTF8), ("classes.csv",)),
    Case("make-ooc", "classes.csv truncated mid-row", _ooc_table("classes.csv", lambda b: b[: b.rindex(b",n0") + 5]),
         ("classes.csv",)),  # cut inside the last row's wnid
    Case("make-ooc", "selection.csv with an unterminated quote", _ooc_table("selection.csv", _unterminated_quote),
         ("selection.csv", "quote")),
    Case("make-ooc", "selection.csv with a BOM inside", _ooc_table("selection.csv", lambda b: b + b"\xef\xbb\xbf" + b),
         ("selection.csv",)),
    Case("make-ooc", "background table not UTF-8",
         _ooc_table("background_categories.csv", lambda b: NON_UTF8 + b), ("background_categories.csv",)),
    Case("make-ooc", "a background declaring 40000 x 40000 px",
         _ooc_file("backgrounds/*/*.jpg", lambda p: png_declaring(40000, 40000)), (".jpg",)),
    Case("make-ooc", "a mask declaring 20000 x 20000 px",
         _ooc_file("openimages/validation-masks/*.png", lambda p: png_declaring(20000, 20000, colour=0)), (".png",)),
    Case("make-ooc", "a truncated photo", _ooc_file("openimages/validation/*.jpg", lambda p: _truncate(p.read_bytes())),
         (".jpg",)),
    Case("make-ooc", "an absurd size", lambda tmp, i: _sample_argv(SAMPLE_DIR, tmp / "out", **{"--size": "1e12"}),
         ("--size",)),
    Case("make-ooc", "a NaN object scale",
         lambda tmp, i: _sample_argv(SAMPLE_DIR, tmp / "out", **{"--object-scale": "nan"}), ("--object-scale",)),
]


# --------------------------------------------------------------------------------------- evaluate
def _evaluate(tmp: Path, data: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", "efficientnet_lite0.offline_in1k", "--data", str(data), "--out", str(tmp / "out"),
            "--workers", "0", *extra]


def _ooc_with_manifest(edit: Callable[[bytes], bytes]) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, inputs: dict) -> list[str]:
        ooc = _copy(inputs["ooc"], tmp / "ooc")
        m = ooc / "manifest.csv"
        m.write_bytes(edit(m.read_bytes()))
        return _evaluate(tmp, ooc)
    return make


def _ooc_with_image(data: Callable[[Path], bytes]) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, inputs: dict) -> list[str]:
        ooc = _copy(inputs["ooc"], tmp / "ooc")
        victim = sorted(ooc.glob("*/*.png"))[0]
        victim.write_bytes(data(victim))
        return _evaluate(tmp, ooc)
    return make


EVALUATE = [
    Case("evaluate", "manifest.csv not UTF-8", _ooc_with_manifest(lambda b: b[:200] + NON_UTF8 + b[200:]),
         ("manifest.csv",)),
    Case("evaluate", "manifest.csv truncated mid-row", _ooc_with_manifest(lambda b: b[: len(b) // 2]),
         ("manifest.csv",)),
    Case("evaluate", "manifest.csv empty", _ooc_with_manifest(lambda b: b""), ("manifest.csv",)),
    Case("evaluate", "an image truncated after the build", _ooc_with_image(lambda p: _truncate(p.read_bytes())),
         (".png",)),
    Case("evaluate", "an image declaring 40000 x 40000 px", _ooc_with_image(lambda p: png_declaring(40000, 40000)),
         (".png",)),
    Case("evaluate", "a zero batch size", lambda tmp, i: _evaluate(tmp, i["ooc"], "--batch-size", "0"),
         ("--batch-size",)),
    Case("evaluate", "an absurd image size", lambda tmp, i: _evaluate(tmp, i["ooc"], "--image-size", "99999999"),
         ("--image-size",)),
    Case("evaluate", "a label map not UTF-8",
         lambda tmp, i: _evaluate(tmp, i["ooc"], "--label-map", str(_damaged(i["csv"], tmp / "map.txt",
                                                                              lambda b: NON_UTF8))),
         ("map.txt",)),
]


# ----------------------------------------------------------------------------------------- report
def _results_with(name: str, edit: Callable[[bytes], bytes]) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, inputs: dict) -> list[str]:
        ev = _copy(inputs["ev"], tmp / "ev")
        (ev / name).write_bytes(edit((ev / name).read_bytes()))
        return ["report", str(ev), "--out", str(tmp / "out")]
    return make


REPORT = [
    Case("report", "predictions.csv truncated", _results_with("predictions.csv", _truncate), ("predictions.csv",)),
    Case("report", "predictions.csv not UTF-8", _results_with("predictions.csv", lambda b: b[:300] + NON_UTF8),
         ("predictions.csv",)),
    Case("report", "summary.json with an empty model", _results_with("summary.json", lambda b: b'{"model": {}}'),
         ("summary.json",)),
    Case("report", "summary.json truncated", _results_with("summary.json", _truncate), ("summary.json",)),
    Case("report", "summary.json a list", _results_with("summary.json", lambda b: b"[1, 2]"), ("summary.json",)),
]


# ---------------------------------------------------------------------------------------- convert
def _npz_with(member: str, data: bytes) -> bytes:
    buf = stdio.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, data)
    return buf.getvalue()


def _npy_header_declaring(shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 16


def _convert(src_name: str, data: Callable[[Path], bytes], dst: str = "out.npz") -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, inputs: dict) -> list[str]:
        src = tmp / src_name
        src.write_bytes(data(tmp))
        return ["convert", str(src), str(tmp / "out" / dst)]
    return make


def _bitlab_file_with(**config) -> Callable[[Path], bytes]:
    """A real bitlab model file (a 1-block-per-stage ResNetV2 at width 1/2) whose recorded config
    then says `config`."""
    from bitlab.models.checkpoints import FORMAT_TAG
    from bitlab.models.resnetv2 import ResNetV2, ResNetV2Config

    def data(tmp: Path) -> bytes:
        model = ResNetV2(ResNetV2Config(block_units=(1, 1, 1, 1), width_factor=0.5, num_classes=10))
        buf = stdio.BytesIO()
        torch.save({"format": FORMAT_TAG, "version": 1, "config": {**model.config.to_dict(), **config},
                    "state_dict": model.state_dict()}, buf)
        return buf.getvalue()
    return data


CONVERT = [
    Case("convert", "an npz member declaring 10 PiB",
         _convert("huge.npz", lambda t: _npz_with("resnet/root_block/standardized_conv2d/kernel.npy",
                                                  _npy_header_declaring((2 ** 25, 2 ** 25, 2 ** 4)))),
         ("huge.npz", "kernel")),
    Case("convert", "a truncated npz", _convert("cut.npz", lambda t: _truncate(
        _npz_with("resnet/root_block/standardized_conv2d/kernel.npy", _npy_header_declaring((7, 7, 3, 64))))),
         ("cut.npz",)),
    Case("convert", "an HTML page saved as .npz", _convert("page.npz", lambda t: b"<html><body>404</body></html>"),
         ("page.npz",)),
    Case("convert", "a bitlab file with width_factor 1e6", _convert("wide.pt", _bitlab_file_with(width_factor=1e6)),
         ("wide.pt", "config")),  # caught by the shape check, before any allocation
    Case("convert", "a bitlab file with block_units 'abc'", _convert("abc.pt", _bitlab_file_with(block_units="abc")),
         ("abc.pt", "block_units")),
    Case("convert", "a bitlab file with num_classes -3", _convert("neg.pt", _bitlab_file_with(num_classes=-3)),
         ("neg.pt", "num_classes")),
]


# ------------------------------------------------------------------------------- training verbs
def _train(verb: str, data: Callable[[Path, dict], Path], *extra: str) -> Callable[[Path, dict], list[str]]:
    def make(tmp: Path, inputs: dict) -> list[str]:
        weights = [] if verb == "pretrain" else ["--random-init"]  # pretrain starts from random weights anyway
        return [verb, "--model", "R14x0.25", *weights, "--data", str(data(tmp, inputs)), "--out", str(tmp / "out"),
                "--workers", "0", *extra]
    return make


def _csv_edited(edit: Callable[[bytes], bytes]) -> Callable[[Path, dict], Path]:
    def data(tmp: Path, inputs: dict) -> Path:
        folder = _copy(inputs["folder"], tmp / "folder")
        (folder / "data.csv").write_bytes(edit((folder / "data.csv").read_bytes()))
        return folder / "data.csv"
    return data


def _good_csv(tmp: Path, inputs: dict) -> Path:
    return inputs["csv"]


TRAINING = [
    Case("finetune", "data CSV not UTF-8", _train("finetune", _csv_edited(lambda b: b + NON_UTF8)), ("data.csv",)),
    Case("finetune", "data CSV naming a missing file",
         _train("finetune", _csv_edited(lambda b: b + b"a/missing.png,a\n")), ("data.csv", "missing.png")),
    Case("finetune", "data CSV truncated mid-row", _train("finetune", _csv_edited(lambda b: b + b"a/0.png")),
         ("data.csv",)),
    Case("finetune", "a NaN learning rate", _train("finetune", _good_csv, "--base-lr", "nan"), ("--base-lr",)),
    Case("finetune", "a zero batch size", _train("finetune", _good_csv, "--batch-size", "0"), ("--batch-size",)),
    Case("fewshot", "negative shots", _train("fewshot", _good_csv, "--shots", "-1"), ("--shots",)),
    Case("fewshot", "data CSV with a BOM mid-file", _train("fewshot", _csv_edited(lambda b: b + b"\xef\xbb\xbfa/0.png,a\n")),
         ("data.csv",)),
    Case("pretrain", "data CSV not UTF-8", _train("pretrain", _csv_edited(lambda b: NON_UTF8 + b)), ("data.csv",)),
    Case("pretrain", "negative epochs", _train("pretrain", _good_csv, "--epochs", "-1"), ("--epochs",)),
    Case("shards", "data CSV not UTF-8",
         lambda tmp, i: ["shards", "--data", str(_csv_edited(lambda b: b + NON_UTF8)(tmp, i)), "--out", str(tmp / "out")],
         ("data.csv",)),
    Case("shards", "a zero shard size",
         lambda tmp, i: ["shards", "--data", str(i["csv"]), "--out", str(tmp / "out"), "--shard-size", "0"],
         ("--shard-size",)),
]


# ------------------------------------------------------------------------------------ other verbs
def _dedup(tmp: Path, inputs: dict, *extra: str) -> list[str]:
    return ["dedup", "--upstream", str(inputs["folder"]), "--downstream", str(inputs["folder"]), "--out",
            str(tmp / "out"), "--embedding", "phash", *extra]


OTHERS = [
    Case("dedup", "a threshold above 1", lambda tmp, i: _dedup(tmp, i, "--threshold", "-1"), ("--threshold",)),
    Case("dedup", "predictions CSV not UTF-8",
         lambda tmp, i: _dedup(tmp, i, "--predictions", str(_damaged(i["csv"], tmp / "preds.csv", lambda b: NON_UTF8))),
         ("preds.csv",)),
    Case("hyperrule", "a negative data set size",
         lambda tmp, i: ["hyperrule", "--dataset-size", "-5", "--image-size", "32", "32"], ("--dataset-size",)),
    Case("hyperrule", "a zero image size",
         lambda tmp, i: ["hyperrule", "--dataset-size", "100", "--image-size", "0", "32"], ("--image-size",)),
    Case("weights download", "--out an existing file",
         lambda tmp, i: (tmp / "out").write_bytes(b"x") and ["weights", "download", "BiT-M-R50x1", "--out",
                                                              str(tmp / "out")], ("--out", "not a folder")),
]


CASES = MAKE_OOC + EVALUATE + REPORT + CONVERT + TRAINING + OTHERS


@pytest.mark.parametrize("case", CASES, ids=[f"{c.verb}: {c.what}" for c in CASES])
def test_bad_input_is_a_clean_error(case: Case, inputs, tmp_path, capsys):
    argv = case.make(tmp_path, inputs)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals (a flag that is not a number) exit 2 too
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"bitlab {case.verb}: error:" in err and "Traceback" not in err, err
    for name in case.names:
        assert name in err, (name, err)
    out = tmp_path / case.out
    if out.is_dir():  # a converted file is finished by existing; other verbs by their record files
        left = [p for p in out.rglob("*") if case.verb == "convert" or p.name in FINISHED]
        assert not left, left
