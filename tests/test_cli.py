"""The `bitlab` command: every listed subcommand works, errors exit non-zero with a clear message."""
import subprocess
import sys

import pytest
import torch

from bitlab.cli import build_parser, main
from bitlab.models import checkpoints, create_model


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and command in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "bitlab", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("bitlab ")


def test_models_lists_registry_with_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("BiT-M-R50x1", "BiT-S-R152x4", "BiT-M-R101x3-ILSVRC2012", "R14x0.5"):
        assert name in out
    assert "928.34" in out and "23.5" in out


def test_convert_and_its_errors(tmp_path, capsys):
    torch.manual_seed(0)
    src = checkpoints.save_npz(create_model("R14x0.5", num_classes=2, pretrained=False), tmp_path / "a.npz")
    assert main(["convert", str(src), str(tmp_path / "a.pt")]) == 0
    assert checkpoints.detect_format(tmp_path / "a.pt") == "bitlab"
    assert main(["convert", str(tmp_path / "missing.npz"), str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err
    assert "missing.npz: no such checkpoint file" in err and "Traceback" not in err
    assert not (tmp_path / "b.pt").exists()
