"""Configs: defaults, overrides, and one clear message for each kind of mistake."""

import pytest

from metarestore.config import ConfigError, apply_overrides, flatten, from_dict, load_config


def test_defaults_are_valid_and_overrides_use_yaml():
    cfg = load_config(None, ["train.steps=7", "families.weights={jpeg: 2}", "meta.inner_lr.decoder=0.5"])
    assert cfg.train.steps == 7 and cfg.families.weight("jpeg") == 2.0 and cfg.families.weight("haze") == 1.0
    assert cfg.meta.inner_lr == {"default": 0.01, "decoder": 0.5}


@pytest.mark.parametrize(("data", "message"), [
    ({"trian": {}}, "unknown config key 'trian'"),
    ({"train": {"steps": "many"}}, "train.steps: expected a number"),
    ({"train": {"steps": 1.5}}, "expected an integer"),
    ({"meta": {"algorithm": "magic"}}, "meta.algorithm must be one of"),
    ({"families": {"train": ["fog"]}}, "unknown degradation family 'fog'"),
    ({"families": {"train": ["jpeg"], "held_out": ["jpeg"]}}, "both trained and held out"),
    ({"families": {"weights": {"jpeg": -1}}}, "must be >= 0"),
    ({"families": {"severity": [0.8, 0.2]}}, "families.severity"),
    ({"data": {"patch_size": 60}}, "multiple of 8"),
    ({"meta": {"inner_lr": {"head": 0.1}}}, "unknown group"),
    ({"meta": {"rates": "parameter"}}, "meta.rates: parameter is Meta-SGD's"),
    ({"meta": {"algorithm": "metasgd", "rates": "layer"}}, "meta.rates must be group or parameter"),
    ({"meta": {"first_order": True}}, "meta.first_order is Meta-SGD's option"),
    ({"families": {"unclipped": {"gaussian_noise": 0.5}}}, "families.unclipped is retired: train the awgn family"),
])
def test_mistakes_are_reported(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


def test_a_retired_key_left_empty_in_a_saved_config_still_loads():
    """A checkpoint of 2026-12-06 saved ``families.unclipped: {}``: it resumes and evaluates as before."""
    assert from_dict({"families": {"unclipped": {}, "train": ["jpeg"]}}).families.train == ["jpeg"]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.steps"])


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_adapter_kinds_and_losses_come_from_their_registries():
    from metarestore.meta.losses import LOSSES
    from metarestore.model.kinds import KINDS

    with pytest.raises(ConfigError, match="model.adapt must be one of") as bad_kind:
        from_dict({"model": {"adapt": "prompt"}})
    assert all(name in str(bad_kind.value) for name in KINDS) and "lora" in KINDS
    with pytest.raises(ConfigError, match="meta.loss must be one of") as bad_loss:
        from_dict({"meta": {"loss": "l3"}})
    assert all(name in str(bad_loss.value) for name in LOSSES)
    assert from_dict({"model": {"adapt": "lora"}, "meta": {"loss": "psnr"}}).model.adapt == "lora"
