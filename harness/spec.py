"""A sweep spec, typed: every section a dataclass, every key checked when the YAML is read.

A spec is a YAML file: the shipped ones live in harness/specs/ (`embedded`, `fluid-paper`), any other path works
too. `load_spec` builds a `Spec` through harness/schema.py, so a misspelt or ill-typed key at any level (data,
tokenizers, text, local, resources, cluster, report, eval.<metric>, eval.sampling, ...) is one line naming its
path before anything runs; names the registry or the ladder do not know are caught here too. `run`,
`per_variant` and `per_size` hold RunConfig values (harness/config.py), nested or dotted: each key is checked against
RunConfig, and harness/plan.py builds and validates the whole config of every run when it makes the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from eval.metrics import METRICS
from eval.settings import SamplingSettings
from harness.config import DataConfig, RunConfig, TextConfig, apply_overrides, flatten
from harness.data import PROFILES
from harness.data.shapes import DEFAULT_PROMPTS_PER_TASK, DEFAULT_SIZE, DEFAULT_TRAIN, DEFAULT_VAL
from harness.errors import FluidbenchError
from harness.schema import build, convert, given
from harness.tokenizer_folder import TokenizerTrainOptions

SPECS_DIR = Path(__file__).parent / "specs"
TOKEN_KINDS = ("vq", "kl")


@dataclass
class Resources:
    """What one Slurm job asks for (ignored by the local executor)."""

    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8          # per process; one process (srun task) per GPU
    mem_gb: int = 64                # per node
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None

    def __post_init__(self) -> None:
        for key in ("nodes", "cpus_per_task", "mem_gb", "time_min"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.gpus_per_node < 0:
            raise ValueError(f"gpus_per_node must be >= 0 (0: a CPU job), got {self.gpus_per_node}")

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


# Data, tokenizers, caches, features, tokenizer ceilings (prep) and the report are CPU jobs unless the spec asks
# for GPUs (in `resources.default` or the kind's own section); training and evaluation ask for one GPU.
KIND_DEFAULTS = {"prep": {"gpus_per_node": 0}, "report": {"gpus_per_node": 0}}


@dataclass
class ShapesOptions:
    """`fluidbench data shapes` options: ShapesT2I generated into SWEEP/data."""

    seed: int = 0
    train: int = DEFAULT_TRAIN
    val: int = DEFAULT_VAL
    size: int = DEFAULT_SIZE
    prompts_per_task: int = DEFAULT_PROMPTS_PER_TASK
    align: int = 0

    def __post_init__(self) -> None:
        from harness.data.shapes import ALIGNS

        if self.align not in ALIGNS:
            raise ValueError(f"align must be one of {', '.join(map(str, ALIGNS))} (pixels at 32x32; 0 = objects "
                             f"anywhere), got {self.align}")


@dataclass
class DataSpec(DataConfig):
    """The RunConfig `data` section of every run, or `shapes: {...}` to generate ShapesT2I into SWEEP/data."""

    shapes: ShapesOptions | None = None


@dataclass
class TokenizerSpec:
    """A published tokenizer (`path: DIR`) or our own, trained by the sweep (`train: {option: value}`)."""

    path: str = ""
    train: TokenizerTrainOptions | None = None

    def __post_init__(self) -> None:
        if not self.path and self.train is None:
            raise ValueError("expected `path: DIR` or `train: {...}`")


@dataclass
class RunName:
    """One training run beyond the grid, or more seeds of a grid run: `seeds: n` trains seeds 0..n-1 of the
    rung (train.seed + k), so the report measures the seed spread instead of assuming it."""

    variant: str
    size: str
    seeds: int = 1


@dataclass
class FeatureOptions:
    """The Shapes-FID extractor's training (`fluidbench eval train-features`)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    width: int = 16
    feature_dim: int = 128


@dataclass
class GridSpec:
    """One sample grid per run: a row of `per_prompt` samples for each fixed prompt, the same seeds everywhere."""

    prompts: list[str]
    per_prompt: int = 4
    seed: int = 0


@dataclass
class EvalSpec:
    """eval.sampling (SamplingSettings), eval.grid, and eval.<metric> for each metric of eval/metrics.py (the
    keyword arguments of its function; null or absent = not measured). eval.geneval.ceiling (a sweep key) also
    scores true scenes through each tokenizer."""

    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    grid: GridSpec | None = None
    metrics: dict[str, Any] = field(default_factory=dict)     # name -> its settings type, in registry order
    ceiling: bool = False

    @classmethod
    def from_values(cls, values: Any, path: str) -> "EvalSpec":
        values = {} if values is None else values
        if not isinstance(values, Mapping):
            raise FluidbenchError(f"{path}: expected a mapping of sampling, grid, {', '.join(METRICS)}")
        known = ["sampling", "grid", *METRICS]
        for key in values:
            if key not in known:
                raise FluidbenchError(f"unknown key '{path}.{key}' ({path} has: {', '.join(known)})")
        spec = cls(sampling=build(SamplingSettings, values.get("sampling") or {}, f"{path}.sampling"),
                   grid=build(GridSpec, values["grid"], f"{path}.grid") if values.get("grid") else None)
        for name, metric in METRICS.items():
            section = values.get(name)
            if not section:
                continue
            if not isinstance(section, Mapping):
                raise FluidbenchError(f"{path}.{name}: expected a mapping of {metric.settings.__name__} keys or null")
            section = dict(section)
            if name == "geneval":
                spec.ceiling = convert(bool, section.pop("ceiling", False), f"{path}.geneval.ceiling")
            spec.metrics[name] = build(metric.settings, section, f"{path}.{name}", owner=f"eval_{name}")
        return spec


@dataclass
class ResourcesSpec:
    """Slurm resources: `default` under every job kind, `train` per size (and its own `default`)."""

    default: Resources | None = None
    prep: Resources | None = None
    train: dict[str, Resources] = field(default_factory=dict)
    eval: Resources | None = None
    report: Resources | None = None


@dataclass
class ClusterSpec:
    """What the scale plan assumes about the GPUs (harness/scale_plan.py, docs/cluster.md)."""

    gpu: str = "GPUs"
    gpu_mem_gb: float = 80
    peak_tflops: float = 989          # dense bf16
    mfu: float = 0.4                  # model FLOPs utilisation for training
    sample_mfu: float = 0.1           # ... for sampling
    max_requeues: int = 100           # Slurm timeouts / preemptions a training job may go through
    text_encoder_online: bool = False
    text_encoder_params: float = 0.0


@dataclass
class LocalSpec:
    """The local executor (harness/local.py)."""

    workers: int = 1                  # jobs side by side, each in its own worker process (1 = in this process)
    threads: int | None = None        # torch threads per worker (None: torch's default in process, 1 in workers)
    exclusive: list[str] = field(default_factory=list)   # job-name globs that run alone on every thread
    status_every: float = 20          # seconds between progress lines of the running jobs

    def __post_init__(self) -> None:
        if self.workers < 1 or (self.threads is not None and self.threads < 1):
            raise ValueError("workers and threads must be >= 1")


@dataclass
class ReportSpec:
    """The report's fits: `offset` adds the constant c to the power law; `n_boot` bootstrap resamples;
    `fit_boot` refits of the compute-optimal fits, `intermediate` adds each run's earlier validations to them
    (harness/isoflop_report.py)."""

    offset: bool = False
    n_boot: int = 1000
    fit_boot: int = 200
    intermediate: bool = False


@dataclass
class IsoflopSpec:
    """An IsoFLOP design (harness/isoflop.py): training budgets in FLOPs x sizes (default: the spec's sizes);
    `shapes` overrides the ladder's token/text shapes (seq_len, vocab_size, token_dim, text_dim) in the FLOP
    accounting."""

    budgets: list[float]
    sizes: list[str] = field(default_factory=list)
    shapes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("budgets: expected a list of training FLOPs")
        for c in self.budgets:
            if not c > 0 or c == float("inf"):
                raise ValueError(f"budgets: {c!r} is not a positive number of FLOPs")


@dataclass
class Spec:
    """A sweep: what to train, on what, how to evaluate it, with what resources. Fields mirror the YAML."""

    name: str
    data: DataSpec
    tokenizers: dict[str, TokenizerSpec]
    text: TextConfig
    ladder: str                                     # cpu | cpu-isoflop | paper
    variants: list[str]
    sizes: list[str]
    out: str = ""                                   # the sweep folder (default results/<name>)
    extra_runs: list[RunName] = field(default_factory=list)
    run: dict = field(default_factory=dict)         # RunConfig values for every run (nested or dotted keys)
    per_variant: dict[str, dict] = field(default_factory=dict)  # variant -> RunConfig values over `run`
    per_size: dict[str, dict] = field(default_factory=dict)   # size -> RunConfig values over those
    features: FeatureOptions = field(default_factory=FeatureOptions)
    eval: EvalSpec = field(default_factory=EvalSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    local: LocalSpec = field(default_factory=LocalSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    isoflop: IsoflopSpec | None = None              # variants x sizes x budgets instead of the grid
    note: str = ""

    @property
    def root(self) -> Path:
        return Path(self.out)

    def data_dir(self) -> Path:
        return Path(self.data.path) if self.data.path else self.root / "data"

    def tokenizer_dir(self, kind: str) -> Path:
        tok = self.tokenizers[kind]
        return Path(tok.path) if tok.path else self.root / "tokenizers" / kind

    def run_dir(self, variant: str, size: str) -> Path:
        return self.root / "runs" / f"{variant}-{size}"

    def runs(self) -> list[tuple[str, str]]:
        """(variant, size) of every training run: the grid, then the extra runs (seed 0 of each)."""
        grid = [(v, s) for v in self.variants for s in self.sizes]
        extra = [(r.variant, r.size) for r in self.extra_runs]
        return grid + [r for r in dict.fromkeys(extra) if r not in grid]

    def extra_seeds(self, variant: str, size: str) -> list[int]:
        """The seeds beyond the first that the spec asks of (variant, size): 1..n-1 for `seeds: n`."""
        n = max([r.seeds for r in self.extra_runs if (r.variant, r.size) == (variant, size)], default=1)
        return list(range(1, n))

    def seed_run_dir(self, variant: str, size: str, seed: int) -> Path:
        """The folder of seed `seed` of a rung: the rung's own for 0, else <variant>-<size>-seed<k>."""
        return self.run_dir(variant, size) if seed == 0 else self.root / "runs" / f"{variant}-{size}-seed{seed}"

    def run_values(self, size: str, variant: str | None = None) -> dict:
        """The spec's RunConfig values for one run: `run`, `per_variant[variant]`, then `per_size[size]` (dotted)."""
        return {**flatten(self.run), **flatten(self.per_variant.get(variant, {})),
                **flatten(self.per_size.get(size, {}))}

    def resources_for(self, kind: str, size: str | None = None) -> Resources:
        """Resources of a job kind (prep, train, eval, report), per size for training when the spec says so."""
        r = self.resources
        values = {**KIND_DEFAULTS.get(kind, {}), **(given(r.default) if r.default else {})}
        if kind == "train":
            for key in ("default", size):
                values.update(given(r.train[key]) if key in r.train else {})
        else:
            section = getattr(r, kind)
            values.update(given(section) if section else {})
        return Resources(**values)

    def snapshot(self) -> dict:
        """The spec as it was read (its values, with the sweep folder), for SWEEP/sweep.json."""
        return {**given(self), "name": self.name, "out": self.out}


def spec_path(name_or_path: str | Path) -> Path:
    """A shipped spec name (harness/specs/<name>.yaml) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FluidbenchError(f"sweep spec {path} not found")
        return path
    shipped = SPECS_DIR / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.yaml")))
        raise FluidbenchError(f"unknown sweep {str(name_or_path)!r}: expected one of {names} or a path to a YAML spec")
    return shipped


def load_spec(name_or_path: str | Path, out: str | Path | None = None) -> Spec:
    """Read and check a spec; `out` overrides its output folder. Any problem: one line naming the key."""
    import yaml

    path = spec_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FluidbenchError(f"sweep spec {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise FluidbenchError(f"sweep spec {path}: expected a mapping at the top level")
    try:
        spec = build(Spec, values, "")
        spec.out = str(out) if out is not None else spec.out or f"results/{spec.name}"
        check_spec(spec)
    except FluidbenchError as e:
        raise FluidbenchError(f"sweep spec {path}: {e}") from None
    return spec


def check_spec(spec: Spec) -> None:
    """Names the registry or the ladder do not know, a missing tokenizer, RunConfig keys that do not exist."""
    from variants.registry import LADDERS, VARIANTS

    if spec.ladder not in LADDERS:
        raise FluidbenchError(f"ladder {spec.ladder!r} unknown (expected one of {', '.join(LADDERS)})")
    rungs = [r.name for r in LADDERS[spec.ladder]]
    for kind, tok in spec.tokenizers.items():
        if kind not in TOKEN_KINDS:
            raise FluidbenchError(f"tokenizers.{kind}: expected vq|kl with `path: DIR` or `train: {{...}}`")
    for i, extra in enumerate(spec.extra_runs):
        if extra.seeds < 1:
            raise FluidbenchError(f"extra_runs[{i}].seeds: expected >= 1 (seeds 0..n-1 of the rung), got {extra.seeds}")
    for variant, size in spec.runs():
        if variant not in VARIANTS:
            raise FluidbenchError(f"variant {variant!r} unknown (expected one of {', '.join(VARIANTS)})")
        if size not in rungs:
            raise FluidbenchError(f"size {size!r} not in the {spec.ladder} ladder ({', '.join(rungs)})")
        kind = token_kind(variant)
        if kind not in spec.tokenizers:
            raise FluidbenchError(f"tokenizers.{kind} missing (needed by {variant})")
    for key in ("kind", "val_kind"):
        value = getattr(spec.data, key)
        if value not in PROFILES and not (key == "val_kind" and value == ""):
            raise FluidbenchError(f"data.{key}={value!r}: expected one of {', '.join(PROFILES)}")
    if not spec.data.path and spec.data.shapes is None:
        raise FluidbenchError("data needs `path: DIR` or `shapes: {...}` to generate ShapesT2I")
    for section, sizes in (("per_size", spec.per_size), ("resources.train", spec.resources.train)):
        for size in sizes:
            if size not in rungs and not (section == "resources.train" and size == "default"):
                raise FluidbenchError(f"{section}.{size}: not in the {spec.ladder} ladder ({', '.join(rungs)})")
    if spec.isoflop is not None:
        from harness.isoflop import check_isoflop

        check_isoflop(spec)
    for variant in spec.per_variant:
        if variant not in spec.variants:
            raise FluidbenchError(f"per_variant.{variant}: not one of the spec's variants ({', '.join(spec.variants)})")
    sections = ([("run", spec.run)] + [(f"per_variant.{v}", x) for v, x in spec.per_variant.items()]
                + [(f"per_size.{s}", x) for s, x in spec.per_size.items()])
    for where, values in sections:
        if not isinstance(values, Mapping):
            raise FluidbenchError(f"{where}: expected a mapping of RunConfig keys")
        for key, value in flatten(values).items():  # key by key, so the error names the spec's own path
            try:
                apply_overrides(RunConfig(), {key: value})
            except FluidbenchError as e:
                raise FluidbenchError(f"{where}.{key}: {e}") from None


def token_kind(variant: str) -> str:
    """The token kind ("vq" | "kl") a variant consumes, from the registry (the harness never parses names)."""
    from variants.registry import VARIANTS

    return VARIANTS[variant][1].token_kind


def order_kind(variant: str) -> str:
    """The generation order ("raster" | "random") of a variant, from the registry."""
    from variants.registry import VARIANTS

    return VARIANTS[variant][0].kind
