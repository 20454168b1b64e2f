"""The training commands' flags come from their settings dataclasses: every setting offered, the
dataclass defaults, --x/--no-x toggles, `--config FILE` with flags overriding it, errors as flags,
and no torch import for the help."""
import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from bitlab.cli import build_parser, main
from bitlab.cli.flags import settings_from_args
from bitlab.train.config import FewShotConfig, FinetuneConfig, PretrainConfig
from tests.fixtures.processes import ENV

REQUIRED = ["--model", "R14x0.5", "--data", "d", "--out", "o"]
# What the commands leave out on purpose: a few-shot sweep sets these per run.
NOT_FLAGS = {"fewshot": {"examples_per_class", "seed", "resume"}}


def _subparser(command: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@pytest.mark.parametrize("command, cls", [("finetune", FinetuneConfig), ("fewshot", FewShotConfig),
                                          ("pretrain", PretrainConfig)])
def test_every_setting_is_a_flag_with_the_dataclass_default(command, cls):
    parser = _subparser(command)
    dests = {a.dest for a in parser._actions if a.help != argparse.SUPPRESS}
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields - dests == NOT_FLAGS.get(command, set())
    args = parser.parse_args(REQUIRED)
    assert settings_from_args(cls, args) == cls(model="R14x0.5", data="d", out="o")  # no default typed twice


def test_toggles_lists_and_choices(capsys):
    parser = _subparser("pretrain")
    args = parser.parse_args([*REQUIRED, "--no-flip", "--compile", "--no-resume", "--decay-epochs", "--preset",
                              "bit-l", "--channels-last"])
    cfg = settings_from_args(PretrainConfig, args)
    assert (cfg.flip, cfg.compile, cfg.resume, cfg.decay_epochs, cfg.preset, cfg.channels_last) == \
        (False, True, False, [], "bit-l", True)
    assert settings_from_args(PretrainConfig, parser.parse_args([*REQUIRED, "--flip", "--no-channels-last"])) \
        .channels_last is False
    with pytest.raises(SystemExit):
        parser.parse_args([*REQUIRED, "--preset", "bit-x"])
    assert "invalid choice: 'bit-x'" in capsys.readouterr().err
    help_text = _subparser("finetune").format_help()
    assert "--no-flip, --flip" in help_text and "--resolution RESIZE CROP" in help_text
    assert "global batch (default: 512)" in help_text and "peak lr (default: 0.003)" in help_text


def test_config_file_with_flags_overriding_it(tmp_path):
    (tmp_path / "c.yaml").write_text("model: R14x0.5\ndata: d\nout: o\nbatch_size: 64\nbase_lr: 1e-2\nflip: false\n")
    parser = _subparser("finetune")
    cfg = settings_from_args(FinetuneConfig, parser.parse_args(["--config", str(tmp_path / "c.yaml")]))
    assert (cfg.batch_size, cfg.base_lr, cfg.flip, cfg.batch_split) == (64, 0.01, False, 1)
    cfg = settings_from_args(FinetuneConfig, parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--flip",
                                                                "--batch-size", "512", "--out", "p"]))
    assert (cfg.batch_size, cfg.flip, cfg.out) == (512, True, "p")  # given flags win, even when they equal a default


def test_config_errors_exit_2_naming_the_key_and_file(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"model": "R14x0.5", "data": "d", "out": "o", "shots": [1]}))
    assert main(["finetune", "--config", str(tmp_path / "c.json")]) == 2
    assert f"bitlab finetune: error: {tmp_path / 'c.json'}: unknown setting 'shots'" in capsys.readouterr().err
    assert main(["pretrain", "--data", "d"]) == 2
    assert "bitlab pretrain: error: the following flags are required: --model, --out" in capsys.readouterr().err


def test_library_errors_are_worded_as_flags(tmp_path, capsys):
    assert main(["pretrain", *REQUIRED, "--crop-area-min", "2"]) == 2
    assert "error: --crop-area-min must be above 0 and at most 1, got 2.0" in capsys.readouterr().err
    assert main(["fewshot", *REQUIRED, "--seeds", "0", "-1"]) == 2
    assert "error: --seeds must be 0 or more, got -1" in capsys.readouterr().err


def test_help_does_not_import_torch():
    for argv in (["--help"], ["finetune", "--help"], ["fewshot", "--help"], ["pretrain", "--help"]):
        code = (f"import sys\nsys.argv = ['bitlab', *{argv!r}]\nfrom bitlab.cli import main\ntry:\n    main()\n"
                "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch was imported'")
        out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
        assert out.returncode == 0 and "usage: bitlab" in out.stdout, (argv, out.stderr[-2000:])
