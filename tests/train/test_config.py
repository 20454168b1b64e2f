"""The training settings: validated on construction, naming the setting; recorded and read back."""
import json

import pytest

from bitlab.errors import ConfigError
from bitlab.settings import read_settings
from bitlab.train.config import FewShotConfig, FinetuneConfig, LoopConfig, PretrainConfig
from bitlab.train.rundir import write_config


@pytest.mark.parametrize("cls, change, setting, message", [
    (PretrainConfig, {"weight_decay": -1.0}, "weight_decay", "must be 0 (none) or more, got -1.0"),
    (PretrainConfig, {"preset": "bit-x"}, "preset", "must be one of bit-s, bit-m, bit-l, got 'bit-x'"),
    (PretrainConfig, {"epochs": 0.0}, "epochs", "must be positive, got 0.0"),
    (PretrainConfig, {"crop_area_min": 0.0}, "crop_area_min", "must be above 0 and at most 1, got 0.0"),
    (FinetuneConfig, {"precision": "fp8"}, "precision", "must be one of fp32, bf16, fp16, got 'fp8'"),
    (FewShotConfig, {"seeds": [0, -2]}, "seeds", "must be 0 or more, got -2"),
    (FewShotConfig, {"seed": 3}, "seed", "=3 is not used by fewshot"),
])
def test_errors_name_the_setting_and_can_name_its_flag(cls, change, setting, message):
    with pytest.raises(ConfigError) as e:
        cls(model="R14x0.5", data="unused", out="unused", **change)
    assert e.value.setting == setting and str(e.value).startswith(setting) and message in str(e.value)
    flag = "--" + setting.replace("_", "-")
    assert e.value.worded(flag) == flag + str(e.value)[len(setting):]


def test_a_missing_weights_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=rf"^pretrained {tmp_path / 'none.npz'}: no such file"):
        FinetuneConfig(model="R14x0.5", data="unused", out="unused", pretrained=str(tmp_path / "none.npz"))


def test_loop_config_takes_the_running_settings():
    cfg = PretrainConfig(model="R14x0.5", data="unused", out="unused", eval_every=7, stop_after=3, progress=False)
    loop = LoopConfig.of(cfg, 50, "bf16", True)
    assert (loop.total_steps, loop.eval_every, loop.checkpoint_every, loop.log_every, loop.stop_after) == (50, 7, 1000,
                                                                                                         50, 3)
    assert (loop.precision, loop.channels_last, loop.progress) == ("bf16", True, False)
    with pytest.raises(ConfigError, match="^precision must be one of"):
        LoopConfig(total_steps=5, precision=None)


@pytest.mark.parametrize("cls", [FinetuneConfig, FewShotConfig, PretrainConfig])
def test_config_json_reads_back_as_the_same_settings(cls, tmp_path):
    """What `--config RUN/config.json` relies on: the record holds every setting, typed as they were."""
    (tmp_path / "data").mkdir()
    cfg = cls(model="R14x0.5", data=str(tmp_path / "data"), out=str(tmp_path / "run"), batch_split=2, progress=False,
              **({"decay_epochs": [10.0, 20.0], "weight_decay": 0.0} if cls is PretrainConfig else
                 {"schedule": [1, 2, 3, 4, 5], "mixup": 0.1}))
    path = write_config(tmp_path / "run", cfg)
    again = cls(**read_settings(cls, path))
    assert again == cfg and json.loads(path.read_text())["data"] == str((tmp_path / "data").resolve())
