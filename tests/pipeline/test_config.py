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


# ------------------------------------------------------------------ choice-valued keys (issue 12 item 11)


def _choice_fields(cls, prefix=""):
    """(dotted key, allowed values) of every Literal-typed field of a (nested) config dataclass."""
    import dataclasses
    import typing

    from vlcache.pipeline.config import _allowed

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _choice_fields(hint, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(hint) is tuple:
            hint = typing.get_args(hint)[0]
        allowed = _allowed(hint)
        if allowed is not None:
            yield f"{prefix}{f.name}", allowed, typing.get_origin(hints[f.name]) is tuple


def _project_configs():
    from vlcache.stages.detect.train import DetectorTrainConfig
    from vlcache.stages.extract.config import ExtractConfig
    from vlcache.stages.caption.train import CaptionTrainConfig
    from vlcache.stages.match.train import MatchTrainConfig

    return [ExtractConfig, CaptionTrainConfig, MatchTrainConfig, DetectorTrainConfig]


def test_region_mode_typo_is_an_error_listing_the_choices():
    from vlcache.stages.extract.config import ExtractConfig

    with pytest.raises(ConfigError, match=r"region_mode='adaptve' is not allowed; choose one of: adaptive, fixed"):
        load_config(ExtractConfig, overrides=["features.region_mode=adaptve"])
    assert load_config(ExtractConfig, overrides=["features.region_mode=fixed"]).features.region_mode == "fixed"


def test_every_choice_valued_key_in_the_project_is_validated(tmp_path):
    keys = {}
    for cls in _project_configs():
        for key, allowed, is_tuple in _choice_fields(cls):
            keys[(cls.__name__, key)] = allowed
            bad = "[bogus]" if is_tuple else "bogus"
            with pytest.raises(ConfigError) as err:
                load_config(cls, overrides=[f"{key}={bad}"])
            leaf = key.rsplit(".", 1)[-1]
            assert f"{leaf}='bogus' is not allowed; choose one of: {', '.join(map(str, allowed))}" in str(err.value)
            # in a YAML file too, naming the file
            f = tmp_path / "c.yaml"
            section, _, name = key.rpartition(".")
            value = ["bogus"] if is_tuple else "bogus"
            f.write_text(__import__("yaml").safe_dump({section: {name: value}} if section else {name: value}))
            with pytest.raises(ConfigError, match=str(f)):
                load_config(cls, f)
            good = f"[{allowed[0]}]" if is_tuple else str(allowed[-1])
            load_config(cls, overrides=[f"{key}={good}"])  # every allowed value is accepted
    # the keys that name a choice, as the code consumes them (a silent fallback before)
    assert {("ExtractConfig", "features.region_mode"), ("ExtractConfig", "features.region_scale"),
            ("ExtractConfig", "features.backbone"), ("ExtractConfig", "detector.arch"), ("ExtractConfig", "match"),
            ("ExtractConfig", "groups"), ("CaptionTrainConfig", "feat_norm"), ("MatchTrainConfig", "model"),
            ("MatchTrainConfig", "captions"), ("MatchTrainConfig", "direction"),
            ("MatchTrainConfig", "agg"), ("DetectorTrainConfig", "backbone")} <= set(keys)


def test_check_choices_on_configs_built_in_python():
    from vlcache.pipeline.config import check_choices
    from vlcache.stages.extract.config import ExtractConfig, FeatureConfig

    check_choices(ExtractConfig())
    with pytest.raises(ConfigError, match=r"config.features: region_scale='BUTD' is not allowed; choose one of: "
                                          r"butd, square"):
        check_choices(ExtractConfig(features=FeatureConfig(region_scale="BUTD")))
    with pytest.raises(ConfigError, match=r"groups='mask' is not allowed"):
        check_choices(ExtractConfig(groups=("grid", "mask")))


def test_cli_extract_refuses_a_misspelt_choice(tmp_path):
    from typer.testing import CliRunner

    from vlcache.cli import app

    r = CliRunner().invoke(app, ["extract", "--dataset", str(tmp_path / "none.json"), "--out",
                                 str(tmp_path / "s.zarr"), "--set", "features.region_mode=adaptve"])
    assert r.exit_code != 0
    assert "region_mode='adaptve' is not allowed; choose one of: adaptive, fixed" in r.output
    assert not (tmp_path / "s.zarr").exists()
