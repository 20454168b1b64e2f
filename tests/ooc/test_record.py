"""make-ooc's record and its readers' check: a folder whose record and images disagree is refused,
naming the file and field; an unfinished or busy build is refused; other manifests are not judged."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bitlab.cli import main
from bitlab.errors import BitlabError
from bitlab.eval.robustness import load_eval_set
from bitlab.ooc.build import build_demo
from bitlab.ooc.record import JOURNAL, check_complete, invalidate
from tests.fixtures.processes import ENV


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo") / "ooc", size=64)


@pytest.fixture
def copy(demo, tmp_path) -> Path:
    out = tmp_path / "ooc"
    shutil.copytree(demo, out)
    return out


def _rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_finished_build_passes_and_is_read(demo):
    check_complete(demo)
    assert len(load_eval_set(demo).items) == 9 * 12  # 9 objects x 12 scenes


def test_an_image_of_another_size_is_named_with_the_field(copy):
    victim = copy / _rows(copy)[0]["file"]
    cv2.imwrite(str(victim), np.zeros((48, 48, 3), np.uint8))  # as a build at --size 48 would leave it
    with pytest.raises(BitlabError, match=rf"{victim.name}: 48x48 px, but .*dataset.json field 'config.size' is 64"):
        check_complete(copy)


def test_an_image_changed_after_the_build_is_named(copy):
    victim = copy / _rows(copy)[-1]["file"]
    img = cv2.imread(str(victim))
    cv2.imwrite(str(victim), 255 - img)  # same size, other pixels
    line = len(_rows(copy)) + 1  # the header is line 1
    with pytest.raises(BitlabError, match=rf"{victim.name}: its sha256 is not .*manifest.csv line {line} field 'sha256'"):
        check_complete(copy)


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "manifest.csv").write_text((out / "manifest.csv").read_text().replace("\n", "\r\n")),
     r"manifest.csv: its sha256 is .*, not .*dataset.json field 'manifest_sha256'"),
    (lambda out: (out / "dataset.json").unlink(), r"ooc: an unfinished make-ooc build \(.make-ooc-journal.jsonl but no "
                                                  r"dataset.json"),
    (lambda out: (out / "manifest.csv").unlink(), r"manifest.csv: missing, but .*dataset.json records a finished build"),
    (lambda out: (out / "dataset.json").write_text(json.dumps({"counts": {"images": 12}})),
     r"dataset.json: field 'manifest_sha256' is missing"),
    (lambda out: (out / "dataset.json").write_text("{"), r"dataset.json: unreadable"),
    (invalidate, "an unfinished make-ooc build"),  # what a rebuild does first
])
def test_a_damaged_record_is_refused(copy, damage, message):
    damage(copy)
    with pytest.raises(BitlabError, match=message):
        check_complete(copy)
    with pytest.raises(BitlabError, match=message):
        load_eval_set(copy)  # what `bitlab evaluate` reads


def test_a_folder_make_ooc_did_not_write_is_not_judged(copy):
    """Hand-made manifests and the official release have no record: nothing to compare."""
    for name in ("dataset.json", JOURNAL):
        (copy / name).unlink()
    (copy / _rows(copy)[0]["file"]).write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    check_complete(copy)


def test_a_build_in_progress_is_refused_by_evaluate(copy, tmp_path, capsys):
    hold = ("import sys, time\nfrom bitlab import fileio\nwith fileio.lock_folder(sys.argv[1], 'make-ooc'):\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(copy)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert main(["evaluate", "--model", "R14x0.5", "--random-init", "--data", str(copy), "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert f"ooc is in use by pid {proc.pid} on" in err and "(bitlab make-ooc, since" in err
    finally:
        proc.kill()
        proc.wait()
    check_complete(copy)  # the lock file the killed holder left is no obstacle
