"""The run config: one dataclass per concern, nested into `RunConfig` (Meta Lingua style).

Resolution order: the defaults below, then a file (JSON or YAML, nested or dotted keys), then `key=value`
overrides with dotted keys (`optim.lr=1e-3`, `model.options.text_dropout=0`). Every value is checked against
its field's type; an unknown or badly typed key is a one-line FluidbenchError naming it. The resolved config
is written to RUN/config.json before step 0, and `RunConfig.from_dict` reads it back.

From Python (the sweep): `RunConfig.from_overrides({"model.variant": "kl-random", "optim.lr": 1e-3, ...})`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from harness.errors import FluidbenchError


@dataclass
class DataConfig:
    """Which images and captions to train and validate on (read through the token/text cache)."""
    kind: str = "shapes"            # shapes | coco | webdataset (harness.data.open_dataset)
    path: str = ""
    train_split: str = "train"
    val_split: str = "val"
    val_kind: str = ""              # validation from another data set ("" = kind / path): Fluid validates on a
    val_path: str = ""              # 30K sample of COCO-2014 train (val_kind coco, val_split train2014)
    val_n: int = 0                  # a sample of this many validation images (coco: seeded; 0 = the whole split)
    cache_dir: str = ""             # "" = the cache's default location

    def source(self, split: str) -> tuple[str, str, str, int | None]:
        """(kind, path, split name, n or None) of "train" or "val"; another name is a split of the training data."""
        if split == "val":
            return self.val_kind or self.kind, self.val_path or self.path, self.val_split, self.val_n or None
        return self.kind, self.path, self.train_split if split == "train" else split, None


@dataclass
class TokenizerConfig:
    """The frozen image tokenizer: a folder from `fluidbench tokenizer train` or a published checkpoint."""
    path: str = ""


@dataclass
class TextConfig:
    """The frozen text encoder."""
    encoder: str = "minilm"         # minilm (embedded) | t5 (paper)
    path: str = ""                  # "" = the encoder's default location
    max_length: int = 32            # 128 for T5 at paper scale (unverified)


@dataclass
class ModelConfig:
    """Which variant and rung of which ladder; `options` go to build_variant as keyword arguments."""
    variant: str = "kl-random"
    size: str = ""                  # "" = the smallest rung of the ladder
    ladder: str = "cpu"             # cpu | cpu-isoflop | paper (variants.registry.LADDERS)
    options: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    """AdamW, the learning-rate schedule, gradient clipping and the EMA: MAR's recipe (LTH14/mar, main_mar.py)."""
    lr: float = 0.0                 # 0 = base_lr * batch_size / 256 (MAR); set it directly for the CPU ladder
    base_lr: float = 1e-4
    lr_scale: float = 1.0           # multiplies the peak lr: a variant's factor on a per-size rule (spec per_variant)
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.02      # not on biases, norms, embeddings or the diffusion head
    warmup_steps: int = 100         # linear warm-up from 0
    schedule: str = "constant"      # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.0       # cosine ends at lr * min_lr_ratio
    grad_clip: float = 3.0          # 0 = off
    ema_decay: float = 0.9999
    # min(ema_decay, (1 + step) / (10 + step)): a short horizon early, so short CPU runs get a useful EMA,
    # converging to ema_decay in long runs.
    ema_warmup: bool = True


@dataclass
class TrainConfig:
    """Length, batch, seed, intervals and the validation protocol."""
    steps: int = 1000
    batch_size: int = 64            # global: split evenly over the processes
    seed: int = 0
    log_every: int = 10
    val_every: int = 100            # 0 = only at the end
    ckpt_every: int = 100
    keep_last: int = 3
    val_size: int = 1024            # images of the held-out split; 0 = all (paper: 30,000)
    val_batch_size: int = 64
    val_seed: int = 1234            # seeds every mask, order, timestep and noise of the validation loss


@dataclass
class DistConfig:
    """How the run is spread over processes; applied from outside the model."""
    strategy: str = "ddp"           # ddp | fsdp2
    compile: bool = False           # torch.compile each block
    activation_checkpointing: bool = False
    dtype: str = "auto"             # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16


@dataclass
class RunConfig:
    """Everything one training run needs; RUN/config.json holds the resolved one."""
    out: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from nested (or dotted) values, e.g. a RUN/config.json; strict about keys and types."""
        return cls.from_overrides(values)

    @classmethod
    def from_overrides(cls, values: Mapping[str, Any] | Iterable[str] = ()) -> "RunConfig":
        """Defaults, then `values`: a mapping of dotted or nested keys, or `key=value` strings."""
        return apply_overrides(cls(), values)

    def lr(self) -> float:
        """The peak learning rate: set directly, or scaled from base_lr by the batch (MAR); times lr_scale."""
        return (self.optim.lr or self.optim.base_lr * self.train.batch_size / 256) * self.optim.lr_scale

    def validate(self) -> None:
        """Check values that types alone cannot; names the field on failure."""
        from harness.data import KINDS as kinds
        from variants.registry import LADDERS  # the registry's ladders, not a copy of their names
        choices = {"optim.schedule": ("constant", "cosine"), "dist.strategy": ("ddp", "fsdp2"),
                   "dist.dtype": ("auto", "fp32", "bf16"), "model.ladder": tuple(LADDERS),
                   "data.kind": kinds, "data.val_kind": ("", *kinds)}
        for key, allowed in choices.items():
            if _get(self, key) not in allowed:
                raise FluidbenchError(f"config {key}={_get(self, key)!r}: expected one of {', '.join(allowed)}")
        for section in ("data", "text", "optim", "train"):  # nan passes every comparison below
            for name, value in dataclasses.asdict(getattr(self, section)).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise FluidbenchError(f"config {section}.{name}={value}: must be a finite number")
        positive = ["train.steps", "train.batch_size", "train.log_every", "train.ckpt_every", "train.keep_last",
                    "train.val_batch_size", "text.max_length", "optim.lr_scale"]
        non_negative = ["data.val_n", "train.val_every", "train.val_size", "optim.lr", "optim.base_lr", "optim.weight_decay",
                        "optim.warmup_steps", "optim.grad_clip", "optim.min_lr_ratio"]
        for key in positive:
            if _get(self, key) <= 0:
                raise FluidbenchError(f"config {key}={_get(self, key)}: must be > 0")
        for key in non_negative:
            if _get(self, key) < 0:
                raise FluidbenchError(f"config {key}={_get(self, key)}: must be >= 0")
        for key in ("optim.beta1", "optim.beta2", "optim.ema_decay"):
            if not 0 <= _get(self, key) < 1:
                raise FluidbenchError(f"config {key}={_get(self, key)}: must be in [0, 1)")
        for key in ("out", "data.path", "tokenizer.path"):
            if not _get(self, key):
                raise FluidbenchError(f"config {key} is not set")


def load_config(file: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> RunConfig:
    """Defaults, then a JSON/YAML file, then overrides (`key=value` strings or a mapping)."""
    cfg = RunConfig()
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FluidbenchError(f"config file {path} not found")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as e:  # a parse error, whichever the library
            raise FluidbenchError(f"config file {path}: cannot parse ({e})") from e
        if not isinstance(values, dict):
            raise FluidbenchError(f"config file {path}: expected a mapping of keys to values")
        cfg = apply_overrides(cfg, values)
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: RunConfig, values: Mapping[str, Any] | Iterable[str]) -> RunConfig:
    """A copy of `cfg` with `values` applied: dotted or nested keys, typed values or strings to parse."""
    cfg = copy.deepcopy(cfg)
    if isinstance(values, Mapping):
        items = list(_flatten(values))
    else:
        items = []
        for item in values:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise FluidbenchError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
            items.append((key.strip(), raw.strip()))
    for key, value in items:
        _set(cfg, key, value)
    return cfg


def diff(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    fa, fb = dict(_flatten(a.to_dict())), dict(_flatten(b.to_dict()))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """Nested values as one level of dotted keys (model.options stays one value per option)."""
    return dict(_flatten(values))


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        # flatten into model.options key by key (so a file and an override merge), but not below it
        if isinstance(value, Mapping) and value and not dotted.startswith("model.options."):
            yield from _flatten(value, dotted + ".")
        else:
            yield dotted, value


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg: RunConfig, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if isinstance(node, dict):  # inside model.options: free-form keys for build_variant
            node[".".join(parts[i:])] = _parse_option(value)
            return
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            raise FluidbenchError(f"unknown config key {dotted!r} ({where} has: {', '.join(names)})")
        hint = typing.get_type_hints(type(node))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hint) or (hint is dict and not isinstance(value, (dict, str))):
                raise FluidbenchError(f"config key {dotted!r} is a section: set its fields, e.g. {dotted}.<name>=...")
            if hint is dict and isinstance(value, str):
                value = _parse_option(value)
                if not isinstance(value, dict):
                    raise FluidbenchError(f"config key {dotted!r}: expected a JSON object, got {value!r}")
            setattr(node, part, value if hint is dict else _coerce(dotted, value, hint))
            return
        node = getattr(node, part)
        if not (dataclasses.is_dataclass(node) or isinstance(node, dict)):
            raise FluidbenchError(f"unknown config key {dotted!r} ({'.'.join(parts[:i + 1])} is a value)")


def _coerce(key: str, value: Any, hint: type) -> Any:
    """Parse a string or check a typed value against the field's type."""
    if isinstance(value, str) and hint is not str:
        text = value.strip().lower()
        try:
            if hint is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            return hint(value)
        except ValueError:
            raise FluidbenchError(f"config key {key!r}: expected {hint.__name__}, got {value!r}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not hint:  # exact: a bool is not an int, a float is not an int
        raise FluidbenchError(f"config key {key!r}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_option(value: Any) -> Any:
    """A variant option from the command line: JSON if it parses (numbers, booleans, lists), else the string."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        lowered = value.lower()
        return {"true": True, "false": False}.get(lowered, value)
