"""Config precedence: defaults < file < options < --set, and --set value parsing."""

from dataclasses import dataclass, field

import pytest

from vlcache.pipeline.config import ConfigError, load_config, parse_overrides


@dataclass
class Inner:
    size: int = 14
    name: str = "grid"


@dataclass
class Cfg:
    lr: float = 4e-4
    epochs: int = 20
    groups: tuple[str, ...] = ("a", "b")
    inner: Inner = field(default_factory=Inner)


def test_precedence_defaults_file_options_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.001\nepochs: 5\ninner:\n  size: 7\n")
    cfg = load_config(Cfg, f, {"epochs": 9, "inner.name": None}, ["inner.size=3"])
    assert cfg.lr == 0.001  # file over default
    assert cfg.epochs == 9  # option over file
    assert cfg.inner.size == 3  # --set over file
    assert cfg.inner.name == "grid"  # None option = not given
    assert cfg.groups == ("a", "b")


def test_set_values_are_typed():
    assert parse_overrides(["lr=5e-4", "x.y=[1,2]", "z=null", "w=text"]) == {
        "lr": 5e-4, "x": {"y": [1, 2]}, "z": None, "w": "text"}
    assert load_config(Cfg, overrides=["lr=1e-5", "groups=[c]"]).lr == 1e-5


def test_unknown_keys_and_bad_files_name_the_source(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*epoch"):
        load_config(Cfg, overrides=["epoch=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner:\n  colour: red\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Cfg, bad)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])
