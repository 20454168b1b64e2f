"""Settings dataclasses: checks that name the setting, and files read back by their fields' types."""
from dataclasses import dataclass

import pytest

from bitlab.errors import BitlabError, ConfigError
from bitlab.settings import Check, Kind, at_least, kinds, read_settings, setting, validate


@dataclass
class Demo:
    name: str = setting(help="required")
    count: int = setting(2, check=at_least(1))
    rate: float | None = setting(None, check=Check(lambda v: v > 0, "positive"))
    sizes: list[int] | None = setting(None, check=Check(lambda v: v > 0, "positive", each=True))
    mode: str = setting("a", choices=("a", "b"))
    flag: bool = False

    def __post_init__(self) -> None:
        validate(self)


def test_kinds_come_from_the_type_hints():
    assert kinds(Demo) == {"name": Kind(str), "count": Kind(int), "rate": Kind(float, optional=True),
                           "sizes": Kind(int, many=True, optional=True), "mode": Kind(str), "flag": Kind(bool)}


@pytest.mark.parametrize("change, message", [({"count": 0}, "count must be at least 1, got 0"),
                                             ({"rate": -1.0}, "rate must be positive, got -1.0"),
                                             ({"sizes": [3, -4]}, "sizes must be positive, got -4"),
                                             ({"mode": "c"}, "mode must be one of a, b, got 'c'")])
def test_validate_names_the_setting(change, message):
    with pytest.raises(ConfigError) as e:
        Demo(name="x", **change)
    assert str(e.value) == message and e.value.setting == next(iter(change))
    assert Demo(name="x", rate=None, sizes=None).count == 2  # None is "the default": not checked


def test_settings_files_in_json_and_yaml(tmp_path):
    (tmp_path / "s.json").write_text('{"name": "x", "count": 3, "rate": 2, "sizes": [1, 2], "flag": true}')
    assert read_settings(Demo, tmp_path / "s.json") == {"name": "x", "count": 3, "rate": 2.0, "sizes": [1, 2],
                                                         "flag": True}
    # YAML 1.1 reads 1e-4 (no dot) as a string: taken as the float it means
    (tmp_path / "s.yaml").write_text("name: x\nrate: 1e-4\nsizes: [4]\nmode: b\n")
    assert read_settings(Demo, tmp_path / "s.yaml") == {"name": "x", "rate": 1e-4, "sizes": [4], "mode": "b"}


@pytest.mark.parametrize("text, message", [
    ("name: x\ncolour: red\n", r"s.yaml: unknown setting 'colour' \(the settings are name, count"),
    ("count: '3'\n", "s.yaml: count must be int, got '3'"),
    ("count: true\n", "s.yaml: count must be int, got True"),
    ("count: null\n", "s.yaml: count must be int, got None"),
    ("sizes: 3\n", "s.yaml: sizes must be a list of int or null, got 3"),
    ("- a\n- b\n", "s.yaml: expected settings as key: value pairs, found list"),
    ("name: [x\n", "s.yaml: not valid YAML"),
])
def test_bad_settings_files_name_the_key_and_the_file(tmp_path, text, message):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(BitlabError, match=message):
        read_settings(Demo, tmp_path / "s.yaml")
