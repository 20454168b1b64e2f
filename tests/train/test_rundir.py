"""The run directory: config.json, metrics (jsonl, csv, TensorBoard), resume checks and the run record."""
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from bitlab import fileio
from bitlab.errors import BitlabError
from bitlab.train import rundir
from bitlab.train.distributed import DistInfo


def test_write_config(tmp_path):
    @dataclass
    class Cfg:
        a: int = 1
        b: list = None

    path = rundir.write_config(tmp_path / "run", Cfg(b=[1, 2]))
    assert json.loads(Path(path).read_text()) == {"a": 1, "b": [1, 2]}


def test_metrics_go_to_jsonl_csv_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = rundir.MetricsWriter(tmp_path)
    writer.write({"step": 1, "split": "train", "loss": 2.5, "lr": 0.1})
    writer.write({"step": 2, "split": "train", "loss": 1.5, "lr": 0.05})
    writer.write({"step": 2, "split": "val", "top1": 0.75})  # a new column: the CSV is rewritten
    writer.close()
    assert [r["step"] for r in rundir.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 2]
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["step", "split", "loss", "lr", "top1"] and len(lines) == 4
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [(2, 0.75)]


@dataclass
class Settings:
    model: str = "R14x0.5"
    data: str = "builtin:digits"
    lr: float = 0.1

    PATH_FIELDS = ("data",)
    RESUME_HINT = "pass --again"


def test_resume_checks_name_what_changed(tmp_path):
    run = tmp_path / "run"
    assert rundir.check_resume_settings(run, Settings(), ("model", "lr")) is None  # nothing to resume
    run.mkdir()
    rundir.write_config(run, Settings())
    (run / "checkpoint.pt").write_bytes(b"")
    fileio.write_json(run / "plan.json", {"images": 10})
    assert rundir.check_resume_settings(run, Settings(lr=0.5), ("model",), counts={"images": 10}) == {"images": 10}
    with pytest.raises(BitlabError, match="already holds a training checkpoint; pass --again to continue"):
        rundir.check_resume_settings(run, Settings(), ("model",), resume=False)
    with pytest.raises(BitlabError, match=r"config.json: cannot resume this checkpoint .*\(lr: 0.1 -> 0.5\)"):
        rundir.check_resume_settings(run, Settings(lr=0.5), ("model", "lr"))
    with pytest.raises(BitlabError, match=r"plan.json: the data changed .*\(images: 10 -> 11\)"):
        rundir.check_resume_settings(run, Settings(), ("model",), counts={"images": 11})


def test_a_data_path_is_recorded_and_compared_resolved(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    rundir.write_config(tmp_path / "run", Settings(data="d"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str((tmp_path / "d").resolve())
    rundir.check_settings(tmp_path / "run", Settings(data=str(tmp_path / "d")), ("data",))  # the same folder
    with pytest.raises(BitlabError, match=r"data: .* -> 'builtin:digits'"):
        rundir.check_settings(tmp_path / "run", Settings(), ("data",))


def test_run_record_keeps_nothing_of_a_refused_start_and_records_a_claimed_failure(tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(BitlabError), rundir.RunRecord(run, DistInfo()):
        raise BitlabError("unknown model")
    assert not (tmp_path / "new").exists()  # its log.txt and the folders it made are gone
    with pytest.raises(BitlabError), rundir.RunRecord(run, DistInfo()) as record:
        record.claim()
        raise BitlabError("cannot read x.jpg")
    summary = json.loads((run / "summary.json").read_text())
    assert summary == {"completed": False, "error": "cannot read x.jpg", "error_type": "BitlabError",
                       "checkpoint_step": None}
    assert "run stopped by an error: cannot read x.jpg" in (run / "log.txt").read_text()
