"""The run config: defaults, then a file, then key=value overrides; strict keys and types."""
from __future__ import annotations

import json

import pytest

from harness.config import RunConfig, diff, load_config
from harness.errors import FluidbenchError


def test_defaults_follow_the_recipe():
    cfg = RunConfig()
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.02, 3.0)
    assert cfg.optim.ema_decay == 0.9999 and cfg.dist.strategy == "ddp"
    cfg.train.batch_size = 2048
    assert cfg.lr() == pytest.approx(1e-4 * 2048 / 256)  # MAR's scaling when lr is not set
    cfg.optim.lr = 3e-3
    assert cfg.lr() == 3e-3


def test_file_then_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.002\n  schedule: cosine\ntrain.steps: 50\n"
                                     "model:\n  options: {text_dropout: 0.0}\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.steps=7", "dist.compile=true", "model.options.blocks=2"])
    assert cfg.optim.lr == 0.002 and cfg.optim.schedule == "cosine"
    assert cfg.train.steps == 7 and cfg.dist.compile is True
    assert cfg.model.options == {"text_dropout": 0.0, "blocks": 2}  # merged, values parsed as JSON
    (tmp_path / "c.json").write_text(json.dumps({"train": {"seed": 3}}))
    assert load_config(tmp_path / "c.json").train.seed == 3


def test_round_trip_and_diff():
    cfg = RunConfig.from_overrides({"model.variant": "vq-raster", "optim": {"lr": 1e-3}, "train.steps": 9})
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert diff(RunConfig(), cfg) == ["model.variant", "optim.lr", "train.steps"]
    assert RunConfig().optim.lr == 0.0  # from_overrides copied, never mutated the defaults


@pytest.mark.parametrize("overrides, words", [
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["nope.x=3"], "unknown config key 'nope.x'"),
    (["train.steps=1.5"], "'train.steps': expected int"),
    (["optim.lr=fast"], "'optim.lr': expected float"),
    (["dist.compile=maybe"], "'dist.compile': expected bool"),
    (["optim=3"], "'optim' is a section"),
    (["train.steps"], "expected key=value"),
    ({"train.steps": True}, "'train.steps': expected int, got bool"),
    ({"train.seed": 1.0}, "'train.seed': expected int, got float"),
])
def test_bad_keys_and_types_name_the_field(overrides, words):
    with pytest.raises(FluidbenchError, match="^[^\n]*$") as e:
        RunConfig.from_overrides(overrides)
    assert words in str(e.value)


@pytest.mark.parametrize("key, value", [("dist.strategy", "zero3"), ("optim.schedule", "step"),
                                        ("train.batch_size", 0), ("optim.ema_decay", 1.0), ("out", ""),
                                        ("data.kind", "parquet"), ("data.val_kind", "cocoa"), ("data.val_n", -1)])
def test_validate_names_the_field(key, value):
    cfg = RunConfig.from_overrides({"out": "r", "data.path": "d", "tokenizer.path": "t", key: value})
    with pytest.raises(FluidbenchError, match=key.replace(".", r"\.")):
        cfg.validate()


def test_missing_or_unparsable_file(tmp_path):
    with pytest.raises(FluidbenchError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(FluidbenchError, match="cannot parse"):
        load_config(tmp_path / "bad.json")
