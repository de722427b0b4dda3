"""The jobs of a sweep, typed: each a dataclass that knows its work, outputs, key and command line.

A job is built by harness/plan.py with every path resolved and every config constructed (a `TrainRun` holds
its validated RunConfig, an `Evaluate` its metric's settings type), so nothing is looked up by name when it
runs and `run()` needs no spec. `args` are the plain values the job was built from (what the spec set, as
written): its settings key hashes them and its command line, the equivalent `fluidbench` call printed by
`--dry-run`, is written from them, so the two cannot disagree. harness/sweep.py decides what to run and
records it; this file only knows how.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from eval.metrics import METRICS
from eval.settings import SamplingSettings
from harness.atomic import write_json
from harness.config import RunConfig
from harness.schema import given
from harness.spec import FeatureOptions, GridSpec, Resources, ShapesOptions
from harness.tokenizer_folder import TokenizerTrainOptions


def _cmd(*parts: Any, options: dict | None = None) -> str:
    words = [str(p) for p in parts]
    for key, value in (options or {}).items():
        if isinstance(value, bool):  # a typer switch: the flag alone, or nothing
            words += [f"--{key.replace('_', '-')}"] if value else []
        elif value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(words)


def _flags(settings: Any, values: dict) -> list[str]:
    """`values` of a settings dataclass (eval/settings.py) as the command-line flags its fields declare."""
    fields = settings.__dataclass_fields__
    words = []
    for key, value in values.items():
        flag = fields[key].metadata["flags"][0]
        if isinstance(value, bool):  # a switch, "--floor/--no-floor": one word
            on, _, off = flag.partition("/")
            words.append(on if value or not off else off)
        else:
            words += [flag, str(value)]
    return words


@dataclass(kw_only=True)
class Job:
    """One unit of work: its name, the files that prove it done, the jobs it waits for, what it asks of Slurm."""

    name: str                        # unique, path-like: "train/kl-random-S", "eval/fid/kl-random-S"
    outputs: list[str]               # files; all present (+ a matching stamp) = done
    deps: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    key: str = ""                    # hash of `stage` and `args` (set by the plan, relative to the sweep folder)

    stage: ClassVar[str] = "job"     # the kind of work, part of the key
    waits_for_any: ClassVar[bool] = False   # runs once its dependencies ended, failed or not (the report)

    @property
    def args(self) -> dict:
        """The plain values the job was built from (JSON): what its key hashes."""
        return {}

    @property
    def command(self) -> str:
        """The equivalent fluidbench command line, for people and --dry-run."""
        return ""

    def run(self) -> None:
        """Do the work, writing the outputs atomically."""
        raise NotImplementedError(self.name)


# ---------------------------------------------------------------------------------------------- preparation
@dataclass(kw_only=True)
class MakeData(Job):
    """ShapesT2I into SWEEP/data (`fluidbench data shapes`)."""

    out: str
    options: ShapesOptions
    stage: ClassVar[str] = "make_data"

    @property
    def args(self) -> dict:
        return {"options": given(self.options)}

    @property
    def command(self) -> str:
        return _cmd("fluidbench", "data", "shapes", "--out", self.out, options=given(self.options))

    def run(self) -> None:
        from harness.data.shapes import write_shapes

        o = self.options
        write_shapes(self.out, seed=o.seed, n_train=o.train, n_val=o.val, size=o.size,
                     prompts_per_task=o.prompts_per_task, align=o.align)


@dataclass(kw_only=True)
class TrainTokenizer(Job):
    """Our own tokenizer on the sweep's data (`fluidbench tokenizer train`)."""

    kind: str
    data: str
    out: str
    options: TokenizerTrainOptions
    stage: ClassVar[str] = "train_tokenizer"

    @property
    def args(self) -> dict:
        return {"kind": self.kind, "options": given(self.options)}

    @property
    def command(self) -> str:
        return _cmd("fluidbench", "tokenizer", "train", "--kind", self.kind, "--data", self.data, "--out", self.out,
                    options=given(self.options))

    def run(self) -> None:
        from harness.tokenizer_folder import train_tokenizer_folder

        train_tokenizer_folder(self.kind, self.data, self.out, self.options)


@dataclass(kw_only=True)
class BuildCache(Job):
    """The cached train and val splits of one token kind (the same cache `fluidbench train` opens), built once
    before any run reads them, so runs side by side never build it twice."""

    kind: str
    values: dict                     # the RunConfig values that decide the cache (data., tokenizer., text.)
    sweep: str                       # the sweep's name, for the command line
    cfg: RunConfig = field(init=False)
    stage: ClassVar[str] = "build_cache"

    def __post_init__(self) -> None:
        self.cfg = RunConfig.from_overrides(self.values)

    @property
    def args(self) -> dict:
        return {"values": self.values}

    @property
    def command(self) -> str:
        return (f"fluidbench sweep {self.sweep} --only {self.name}  # tokens + text of the train and val splits "
                "(what `fluidbench train` caches)")

    def run(self) -> None:
        from harness.cache import CachedSplit
        from harness.devices import default_device
        from harness.runs import load_text_encoder, load_tokenizer

        device = default_device()
        tokenizer, text_encoder = load_tokenizer(self.cfg, device), load_text_encoder(self.cfg, device)
        folders = {split: str(CachedSplit.open(self.cfg, split, tokenizer, text_encoder).folder)
                   for split in ("train", "val")}
        write_json(self.outputs[0], {"folders": folders, "tokenizer": self.cfg.tokenizer.path})


@dataclass(kw_only=True)
class TrainFeatures(Job):
    """The Shapes-FID feature extractor (`fluidbench eval train-features`)."""

    data: str
    out: str
    options: FeatureOptions
    stage: ClassVar[str] = "train_features"

    @property
    def args(self) -> dict:
        return {"options": given(self.options)}

    @property
    def command(self) -> str:
        return _cmd("fluidbench", "eval", "train-features", "--data", self.data, "--out", self.out,
                    options=given(self.options))

    def run(self) -> None:
        from eval.shapes_features import train_features

        train_features(self.data, self.out, **asdict(self.options))


@dataclass(kw_only=True)
class TokenizerCeiling(Job):
    """GenEval of true scenes after the tokenizer's round trip: the best score any variant on it can reach."""

    kind: str
    tokenizer: str
    prompts: str
    data: str  # the data folder: its scenes' layout (manifest `align`) is the ceiling's
    per_prompt: int
    seed: int
    sweep: str
    detector: str
    stage: ClassVar[str] = "tokenizer_ceiling"

    @property
    def args(self) -> dict:
        return {"kind": self.kind, "per_prompt": self.per_prompt, "seed": self.seed}

    @property
    def command(self) -> str:
        return (f"fluidbench sweep {self.sweep} --only {self.name}  # true scenes -> {self.kind} encode/decode -> "
                f"GenEval ({self.detector})")

    def run(self) -> None:
        import numpy as np
        import torch

        from eval.detectors import ShapesOracleDetector
        from eval.geneval import score_folder
        from eval.geneval_folder import load_prompts, write_prompt_folder
        from eval.sampling import to_uint8
        from harness.data.shapes import manifest_align, render_prompt
        from variants.tokenizers import load_tokenizer

        manifest = Path(self.data) / "manifest.json"
        align = manifest_align(json.loads(manifest.read_text())) if manifest.is_file() else 0
        tokenizer = load_tokenizer(self.tokenizer)
        prompts = load_prompts(self.prompts)
        folder = Path(self.outputs[0]).with_suffix("")  # TOKENIZER/ceiling/
        scenes = {}
        for index, meta in enumerate(prompts):  # one stream per prompt: the same scenes for every tokenizer
            rng = np.random.default_rng([self.seed, index])
            scenes[index] = [render_prompt(meta, rng, tokenizer.image_size, align=align)[0]
                             for _ in range(self.per_prompt)]
        with torch.no_grad():
            for index, meta in enumerate(prompts):
                x = torch.from_numpy(np.stack(scenes[index])).permute(0, 3, 1, 2).float() / 127.5 - 1
                write_prompt_folder(folder / "reconstructed", index, meta,
                                    to_uint8(tokenizer.decode(tokenizer.encode(x))))
                write_prompt_folder(folder / "true", index, meta, scenes[index])
        detector = ShapesOracleDetector()
        reconstructed = score_folder(folder / "reconstructed", detector, progress=False)
        true = score_folder(folder / "true", detector, progress=False)
        write_json(self.outputs[0], {**reconstructed, "true_scenes_overall": true["overall"],
                                     "tokenizer": self.tokenizer, "prompts": self.prompts,
                                     "per_prompt": self.per_prompt, "seed": self.seed})


# ------------------------------------------------------------------------------------------------------ runs
@dataclass(kw_only=True)
class TrainRun(Job):
    """One training run (`fluidbench train`); resumes from the run's latest checkpoint if it has one."""

    values: dict                     # every RunConfig value the sweep sets (dotted keys)
    cfg: RunConfig = field(init=False)
    stage: ClassVar[str] = "train_run"

    def __post_init__(self) -> None:
        from harness.runs import check_names

        self.cfg = RunConfig.from_overrides(self.values)
        self.cfg.validate()
        check_names(self.cfg)

    @property
    def args(self) -> dict:
        return {"values": self.values}

    @property
    def command(self) -> str:
        v = self.values
        identity = {"--variant": v["model.variant"], "--size": v["model.size"], "--data": v["data.path"],
                    "--tokenizer": v["tokenizer.path"], "--out": v["out"]}
        skip = {"out", "data.path", "tokenizer.path", "model.variant", "model.size"}
        overrides = [f"{k}={x}" for k, x in v.items() if k not in skip]
        return shlex.join(["fluidbench", "train", *[str(w) for kv in identity.items() for w in kv], *overrides])

    def run(self) -> None:
        from harness import train

        train.train(self.cfg)


@dataclass(kw_only=True)
class TrainCell(TrainRun):
    """One cell of an IsoFLOP design (harness/isoflop.py): a training run whose steps spend its budget; it
    checks the FLOP accounting against the real tokenizer and records the cell (RUN/isoflop.json) first."""

    cell: dict                       # Cell.record(): variant, size, budget, steps, flops_per_step, batch_size, ...
    shapes: dict                     # the token/text shapes the plan's accounting used
    stage: ClassVar[str] = "train_cell"

    @property
    def args(self) -> dict:
        return {"values": self.values, "cell": self.cell}

    @property
    def command(self) -> str:
        c = self.cell
        return (f"{super().command}  # budget {c['budget']:.3g} FLOPs = {c['steps']} steps x "
                f"{c['flops_per_step']:.3g} ({c['rounding']:+.2%})")

    def run(self) -> None:
        from harness import train
        from harness.isoflop import check_accounting

        check_accounting(self.cfg, self.cell, self.shapes)
        write_json(Path(self.cfg.out) / "isoflop.json", self.cell)
        train.train(self.cfg)


@dataclass(kw_only=True)
class Evaluate(Job):
    """One metric of one run (`fluidbench eval <metric>`): sample the EMA weights, score, RUN/eval/<result>."""

    metric: str                      # a key of eval.metrics.METRICS
    run_dir: str
    settings: Any                    # the metric's settings type, built from the spec's values
    sampling: SamplingSettings

    @property
    def stage(self) -> str:  # type: ignore[override]
        return f"eval_{self.metric}"

    @property
    def args(self) -> dict:
        return {"run": self.run_dir, "settings": given(self.settings), "sampling": given(self.sampling)}

    @property
    def command(self) -> str:
        words = ["fluidbench", "eval", self.metric, "--run", self.run_dir,
                 *_flags(type(self.settings), given(self.settings)), *_flags(SamplingSettings, given(self.sampling))]
        return shlex.join(words)

    def run(self) -> None:
        METRICS[self.metric].run(self.run_dir, self.settings, self.sampling)


@dataclass(kw_only=True)
class SampleGrid(Job):
    """RUN/eval/samples.png: one row of samples per fixed prompt, the same seeds for every run."""

    run_dir: str
    grid: GridSpec
    sampling: SamplingSettings
    stage: ClassVar[str] = "sample_grid"

    @property
    def args(self) -> dict:
        g = self.grid
        return {"run": self.run_dir, "prompts": list(g.prompts), "per_prompt": g.per_prompt, "seed": g.seed,
                "sampling": given(self.sampling)}

    @property
    def command(self) -> str:
        g = self.grid
        return (f"fluidbench sample --run {self.run_dir} --prompt PROMPT --n {g.per_prompt} --out ...  "
                f"# x {len(g.prompts)} prompts, one row each")

    def run(self) -> None:
        from eval.geneval_folder import png_bytes
        from eval.sampling import generate, image_grid
        from harness.atomic import write_bytes
        from harness.runs import load_run

        g = self.grid
        loaded = load_run(Path(self.run_dir))
        settings = replace(self.sampling, seed=g.seed, batch_size=len(g.prompts) * g.per_prompt)
        captions = [p for p in g.prompts for _ in range(g.per_prompt)]
        images = [image for _, image in generate(loaded, captions, settings, progress=False)]
        out = Path(self.run_dir) / "eval"
        write_json(out / "samples.json", {"prompts": list(g.prompts), "per_prompt": g.per_prompt,
                                          "settings": settings.resolved(loaded.variant)})
        scale = max(1, 96 // images[0].shape[0])  # 32 px samples drawn 3x (nearest: every pixel kept) to be seen
        images = [image.repeat(scale, axis=0).repeat(scale, axis=1) for image in images]
        write_bytes(out / "samples.png", png_bytes(image_grid(images, ncols=g.per_prompt)))


# ---------------------------------------------------------------------------------------------------- report
@dataclass(kw_only=True)
class MakeReport(Job):
    """The results table from the run folders, then report.md and the plots (`fluidbench report`)."""

    root: str
    columns: list[str]
    offset: bool
    n_boot: int
    intermediate: bool | None = None  # the compute-optimal options (harness/isoflop_report.py); None where they
    fit_boot: int | None = None       # do nothing, so they stay out of the key and the command line
    stage: ClassVar[str] = "make_report"
    waits_for_any: ClassVar[bool] = True  # the report draws whatever finished

    @property
    def args(self) -> dict:
        extra = {} if self.fit_boot is None else {"intermediate": self.intermediate, "fit_boot": self.fit_boot}
        return {"columns": self.columns, "offset": self.offset, "n_boot": self.n_boot, **extra}

    @property
    def command(self) -> str:
        return _cmd("fluidbench", "report", self.root, options={"n_boot": self.n_boot, "fit_boot": self.fit_boot}) \
            + (" --offset" if self.offset else "") + (" --intermediate" if self.intermediate else "")

    def run(self) -> None:
        from harness.report import write_report
        from harness.results import collect_runs, write_table

        table = collect_runs(self.root)
        write_table(table, self.root, self.columns)
        extra = {} if self.fit_boot is None else {"intermediate": bool(self.intermediate), "fit_boot": self.fit_boot}
        write_report(self.root, table=table[[c for c in table.columns if c in self.columns]], offset=self.offset,
                     n_boot=self.n_boot, **extra)
