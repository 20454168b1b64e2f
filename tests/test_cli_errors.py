"""The CLI audit's defects: bad flags and unusable paths give `bitlab CMD: error: ...` and exit 2
before any output is created; output is aligned and consistent."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bitlab.cli import main
from bitlab.device import parse_device
from bitlab.errors import BitlabError


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    return folder


@pytest.mark.parametrize("flag,value,message", [
    ("--image-size", "0", "--image-size must be at least 1, got 0"),
    ("--image-size", "-4", "--image-size must be at least 1, got -4"),
    ("--batch-size", "-1", "--batch-size must be at least 1, got -1"),
    ("--workers", "-3", "--workers must be at least 0, got -3"),
    ("--device", "bogus", "--device bogus: not a torch device")])
def test_evaluate_refuses_bad_flags_before_writing(tmp_path, capsys, flag, value, message):
    out = tmp_path / "res"
    assert main(["evaluate", "--model", "R14x0.5", "--data", str(tmp_path), "--out", str(out), flag, value]) == 2
    assert f"bitlab evaluate: error: {message}" in _err(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv", [["convert", "{src}", "{f}/sub/b.pt"],
                                  ["weights", "download", "BiT-M-R50x1", "--base-url", "http://127.0.0.1:9/x",
                                   "--out", "{f}/sub"]])
def test_output_under_a_file_is_a_clean_error(tmp_path, capsys, argv):
    from bitlab.models import checkpoints, create_model

    torch.manual_seed(0)
    src = checkpoints.save_npz(create_model("R14x0.5", num_classes=2, pretrained=False), tmp_path / "a.npz")
    (tmp_path / "f").write_text("a file")
    argv = [a.format(src=src, f=tmp_path / "f") for a in argv]
    assert main(argv) == 2
    flag = "--out " if argv[0] == "weights" else ""  # weights checks its --out folder before any download
    assert f"bitlab {' '.join(argv[:2]) if argv[0] == 'weights' else argv[0]}: error: {flag}{tmp_path / 'f'}/sub" in _err(capsys)


def test_demo_checks_figures_folder_first(tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    assert main(["demo", "--out", str(tmp_path / "d"), "--figures", str(tmp_path / "f" / "x")]) == 2
    assert f"bitlab demo: error: --figures {tmp_path / 'f' / 'x'}: {tmp_path / 'f'} is not a folder" in _err(capsys)
    assert not (tmp_path / "d").exists()


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(BitlabError, match=r"device bogus: not a torch device \(cpu, cuda, cuda:N"):
        parse_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(BitlabError, match="device cuda: no CUDA device here"):
            parse_device("cuda")


@pytest.mark.parametrize("extra,message", [(["--device", "bogus"], "--device bogus: not a torch device"),
                                           (["--gallery", "-1"], "--gallery must be at least 0, got -1"),
                                           (["--workers", "-3"], "--workers must be at least 0, got -3")])
def test_dedup_refuses_bad_flags_before_writing(tmp_path, capsys, extra, message):
    imgs = _images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    assert main(["dedup", "--upstream", str(imgs), "--downstream", str(imgs), "--embedding", "phash",
                 "--out", str(out), *extra]) == 2
    assert f"bitlab dedup: error: {message}" in _err(capsys)
    assert not out.exists()


def test_dedup_unknown_model_is_named_before_any_weights_warning(tmp_path, caplog):
    from bitlab.eval.dedup import DedupConfig, run_dedup

    imgs = _images(tmp_path / "imgs", 1)
    with caplog.at_level(logging.WARNING), pytest.raises(BitlabError, match="NoSuch"):
        run_dedup(DedupConfig(upstream=str(imgs), downstream=str(imgs), out=str(tmp_path / "o"),
                              embedding="model:NoSuch", device="cpu", progress=False))
    assert "random weights" not in caplog.text


def test_dedup_prints_accuracies_with_the_same_decimals(tmp_path, capsys):
    up, down = _images(tmp_path / "up", 2), _images(tmp_path / "down", 3)
    (down / "2.png").write_bytes((up / "0.png").read_bytes())  # not the same as up/0.png? it is: a dup
    cv2.imwrite(str(down / "0.png"), np.full((40, 40, 3), 128, np.uint8))
    cv2.imwrite(str(down / "1.png"), np.tile(np.arange(40, dtype=np.uint8)[:, None, None] * 6, (1, 40, 3)))
    preds = tmp_path / "p.csv"
    preds.write_text("image,correct\n0.png,1\n1.png,1\n2.png,0\n")
    assert main(["dedup", "--upstream", str(up), "--downstream", str(down), "--embedding", "phash",
                 "--predictions", str(preds), "--gallery", "0", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("accuracy"))
    assert "Full 66.67  Dedup 100.00  Dups 1" in line


@pytest.mark.parametrize("argv,message", [
    (["--base-url", "notaurl"], "--base-url notaurl: not an http:// or https:// URL"),
    (["--base-url", "file:///srv/mirror"], "--base-url file:///srv/mirror: not an http:// or https:// URL"),
    (["--sha256", "0000"], "--sha256 0000: not a sha256 digest (64 hex digits)")])
def test_weights_download_checks_flags_first(tmp_path, capsys, argv, message):
    out = tmp_path / "w"
    assert main(["weights", "download", "BiT-M-R50x1", "--out", str(out), *argv]) == 2
    assert f"bitlab weights download: error: {message}" in _err(capsys)
    assert not out.exists()


def test_weights_download_mismatch_leaves_no_folder(tmp_path, capsys, http_server):
    http_server.add("srv/BiT-M-R50x1.npz", b"not the weights")
    out = tmp_path / "w"
    assert main(["weights", "download", "BiT-M-R50x1", "--out", str(out), "--sha256", "a" * 64,
                 "--base-url", f"{http_server.url}/srv"]) == 2
    assert "sha256 mismatch" in _err(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv,message", [
    (["hyperrule", "--dataset-size", "100", "--image-size", "32", "32", "--base-lr", "-1"],
     "--base-lr must be a positive number, got -1.0"),
    (["hyperrule", "--dataset-size", "100", "--image-size", "32", "32", "--base-lr", "nan"],
     "--base-lr must be a positive number, got nan"),
    (["backgrounds", "fetch", "--out", "{tmp}/bg", "--per-category", "-1"], "--per-category must be at least 1"),
    (["report", "{tmp}", "--out", "{tmp}/fig", "--num-images", "-2"], "--num-images must be at least 1, got -2")])
def test_more_numbers_are_checked(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert message in _err(capsys)
    assert not (tmp_path / "bg").exists() and not (tmp_path / "fig").exists()


def test_models_table_is_aligned_with_two_decimals(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert "23.50" in lines[1]
    # the resolution column ends in one place on every row, efficientnet's included
    ends = {re.search(r" (224|260|480)\b", line).end() for line in lines[1:]}
    assert len(ends) == 1, lines


def test_closed_pipe_exits_quietly():
    p = subprocess.Popen([sys.executable, "-m", "bitlab", "models", "--json", "--ablations"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the first line, as with `| head -0`
    err = p.stderr.read().decode()
    assert p.wait() == 141 and err == ""


def test_make_ooc_usage_shows_the_step_is_optional(capsys):
    with pytest.raises(SystemExit):
        main(["make-ooc", "--help"])
    out = capsys.readouterr().out
    assert "STEP" not in out and "[plan]" in out and "bitlab make-ooc plan [options]" in out


@pytest.mark.parametrize("argv,flag", [(["evaluate"], "--batch-size"), (["make-ooc", "plan"], "--split"),
                                       (["make-ooc", "plan"], "--seed"), (["make-ooc"], "--object-scale"),
                                       (["evaluate"], "--no-progress"), (["dedup"], "--no-progress")])
def test_flags_are_documented(capsys, argv, flag):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    options = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    entry = options.split(f"{flag}", 1)[1].split(" --", 1)[0]  # metavar, then the help text
    assert re.sub(r"^\s*[A-Z_]*\s*", "", entry), f"{flag} has no help text"


def test_import_bitlab_loads_submodules_lazily():
    code = ("import sys, bitlab; assert 'torch' not in sys.modules; "
            "print(bitlab.hyperrule.hyperrule.__name__); assert not hasattr(bitlab, 'nosuch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "hyperrule"
