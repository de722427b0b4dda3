"""The stages of a sweep: what each job does, and `plan_jobs`, which lays them out for one spec.

Each stage is a plain function `stage(spec, **args)` that calls the project's Python API (the same code as the
matching `fluidbench` command, whose command line each job also records) and writes its outputs atomically.
harness/sweep.py decides what to run and where; this file only knows how.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from harness.atomic import write_json
from harness.errors import FluidbenchError
from harness.sweep import TOKEN_KINDS, Job, Spec, token_kind

EVAL_METRICS = ("fid", "geneval", "clipscore")


def _cmd(*parts: Any, options: dict | None = None) -> str:
    words = [str(p) for p in parts]
    for key, value in (options or {}).items():
        if value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(words)


# ------------------------------------------------------------------------------------------------------ plan
def plan_jobs(spec: Spec) -> list[Job]:
    """Prep jobs, then per size (smallest first) each variant's training run and its evaluations, then the
    report: a local sweep stopped early has complete rows for every variant at the sizes it reached."""
    jobs: list[Job] = []
    prep, evaluation = spec.resources_for("prep"), spec.resources_for("eval")
    data_deps = []
    if not spec.data.get("path"):
        shapes = dict(spec.data["shapes"])
        jobs.append(Job("data", "make_data", {"options": shapes}, [str(spec.data_dir() / "manifest.json")],
                        resources=prep, command=_cmd("fluidbench", "data", "shapes", "--out", spec.data_dir(),
                                                     options=shapes)))
        data_deps = ["data"]

    kinds = [k for k in TOKEN_KINDS if any(token_kind(v) == k for v, _ in spec.runs())]
    tok_deps: dict[str, list[str]] = {}
    for kind in kinds:
        tok = spec.tokenizers[kind]
        tok_deps[kind] = []
        if tok.get("path"):
            continue
        out = spec.tokenizer_dir(kind)
        options = dict(tok.get("train") or {})
        jobs.append(Job(f"tokenizer/{kind}", "train_tokenizer", {"kind": kind, "options": options},
                        [str(out / "metrics.json")], deps=data_deps, resources=prep,
                        command=_cmd("fluidbench", "tokenizer", "train", "--kind", kind, "--data", spec.data_dir(),
                                     "--out", out, options=options)))
        tok_deps[kind] = [f"tokenizer/{kind}"]

    made_by = dict(tok_deps)  # the tokenizer job of each kind (the ceilings need no cache)
    # Tokens and text of the training data, encoded once per token kind before any run reads them, so runs
    # side by side never build the same cache twice (and 256 GPUs never wait on one rank encoding it).
    for kind in kinds:
        variant = next(v for v, _ in spec.runs() if token_kind(v) == kind)
        values = run_config_values(spec, variant, next(s for v, s in spec.runs() if v == variant))
        values = {k: v for k, v in values.items() if k.startswith(("data.", "tokenizer.", "text."))}  # the key
        jobs.append(Job(f"cache/{kind}", "build_cache", {"values": values},
                        [str(spec.root / "cache" / f"{kind}.json")], deps=data_deps + tok_deps[kind],
                        resources=prep, command=f"fluidbench sweep {spec.name} --only cache/{kind}  # tokens + text "
                                                f"of the train and val splits (what `fluidbench train` caches)"))
        tok_deps[kind] = tok_deps[kind] + [f"cache/{kind}"]

    fid, geneval = spec.eval.get("fid"), spec.eval.get("geneval")
    feature_deps = []
    if fid and spec.data.get("kind") == "shapes":  # Shapes-FID needs its extractor trained on the data
        options = dict(spec.features)
        out = spec.root / "features"
        jobs.append(Job("features", "train_features", {"options": options}, [str(out / "manifest.json")],
                        deps=data_deps, resources=prep,
                        command=_cmd("fluidbench", "eval", "train-features", "--data", spec.data_dir(), "--out", out,
                                     options=options)))
        feature_deps = ["features"]
    ceiling_jobs = []
    if geneval and geneval.get("ceiling", False):
        for kind in kinds:
            out = spec.root / "tokenizers" / kind / "ceiling.json"
            args = {"kind": kind, "per_prompt": geneval.get("per_prompt", 4), "seed": geneval.get("seed", 0)}
            jobs.append(Job(f"ceiling/{kind}", "tokenizer_ceiling", args, [str(out)],
                            deps=data_deps + made_by[kind], resources=prep,
                            command=f"fluidbench sweep {spec.name} --only ceiling/{kind}  # true scenes -> "
                                    f"{kind} encode/decode -> GenEval ({geneval.get('detector', 'shapes-oracle')})"))
            ceiling_jobs.append(f"ceiling/{kind}")

    result_jobs = list(ceiling_jobs)
    sizes = list(dict.fromkeys([s for s in spec.sizes] + [r["size"] for r in spec.extra_runs]))
    for size in sizes:
        for variant in [v for v in dict.fromkeys(spec.variants + [r["variant"] for r in spec.extra_runs])]:
            if (variant, size) not in spec.runs():
                continue
            run_jobs = _run_jobs(spec, variant, size, data_deps + tok_deps[token_kind(variant)], feature_deps,
                                 evaluation)
            jobs += run_jobs
            result_jobs += [j.name for j in run_jobs]

    outputs = [str(spec.root / name) for name in ("runs.csv", "runs.parquet", "report.md")]
    options = {"offset": bool(spec.report.get("offset", False)), "n_boot": int(spec.report.get("n_boot", 1000))}
    jobs.append(Job("report", "make_report", {"columns": table_columns(spec), **options}, outputs, deps=result_jobs,
                    resources=spec.resources_for("report"), command=_cmd("fluidbench", "report", spec.root,
                                 options={"n_boot": options["n_boot"]}) + (" --offset" if options["offset"] else "")))
    return jobs


def run_config_values(spec: Spec, variant: str, size: str) -> dict:
    """Every RunConfig value the sweep sets for one run (dotted keys): spec values, then the run's identity."""
    values = spec.run_values(size)
    values.update({"out": str(spec.run_dir(variant, size)), "data.path": str(spec.data_dir()),
                   "data.kind": spec.data.get("kind", "shapes"),
                   "tokenizer.path": str(spec.tokenizer_dir(token_kind(variant))),
                   "model.variant": variant, "model.size": size, "model.ladder": spec.ladder})
    values.update({f"text.{k}": v for k, v in spec.text.items()})
    values.update({f"data.{k}": v for k, v in spec.data.items() if k not in ("kind", "path", "shapes")})
    return values


def _run_jobs(spec: Spec, variant: str, size: str, deps: list[str], feature_deps: list[str],
              evaluation) -> list[Job]:
    run = spec.run_dir(variant, size)
    name = f"{variant}-{size}"
    values = run_config_values(spec, variant, size)
    identity = {"--variant": variant, "--size": size, "--data": values["data.path"],
                "--tokenizer": values["tokenizer.path"], "--out": run}
    skip = {"out", "data.path", "tokenizer.path", "model.variant", "model.size"}
    overrides = [f"{k}={v}" for k, v in values.items() if k not in skip]
    command = shlex.join(["fluidbench", "train", *[str(w) for kv in identity.items() for w in kv], *overrides])
    jobs = [Job(f"train/{name}", "train_run", {"values": values}, [str(run / "summary.json")], deps=deps,
                resources=spec.resources_for("train", size), command=command)]
    sampling = dict(spec.eval.get("sampling") or {})
    for metric in EVAL_METRICS:
        if not spec.eval.get(metric):
            continue
        settings = eval_settings(spec, metric, bool(feature_deps))
        args = {"run": str(run), "settings": settings, "sampling": sampling}
        jobs.append(Job(f"eval/{metric}/{name}", f"eval_{metric}", args, [str(run / "eval" / f"{metric}.json")],
                        deps=[f"train/{name}"] + (feature_deps if metric == "fid" else []), resources=evaluation,
                        command=_eval_command(metric, run, settings, sampling)))
    grid = spec.eval.get("grid")
    if grid:
        args = {"run": str(run), "prompts": list(grid["prompts"]), "per_prompt": grid.get("per_prompt", 4),
                "seed": grid.get("seed", 0), "sampling": sampling}
        jobs.append(Job(f"eval/grid/{name}", "sample_grid", args, [str(run / "eval" / "samples.png")],
                        deps=[f"train/{name}"], resources=evaluation,
                        command=f"fluidbench sample --run {run} --prompt PROMPT --n {args['per_prompt']} "
                                f"--out ...  # x {len(args['prompts'])} prompts, one row each"))
    return jobs


def eval_settings(spec: Spec, metric: str, own_features: bool) -> dict:
    """The keyword arguments of eval.run_eval.eval_<metric> for this sweep: the spec's, plus the sweep's own
    Shapes-FID extractor and reference cache, and its GenEval prompt file."""
    settings = {k: v for k, v in spec.eval[metric].items() if k != "ceiling"}
    if metric == "fid" and own_features:
        settings.setdefault("weights", str(spec.root / "features"))
        settings.setdefault("cache_dir", str(spec.root / "fid-ref"))
    if metric == "geneval" and geneval_prompts(spec) is not None:
        settings.setdefault("prompts", str(geneval_prompts(spec)))
    return settings


# `fluidbench eval <metric>` flags whose names differ from eval_<metric>'s keyword arguments
CLI_FLAGS = {"per_prompt": "--n", "cache_dir": "--cache", "model": "--clip-model", "cfg_scale": "--cfg"}


def _eval_command(metric: str, run: Path, settings: dict, sampling: dict) -> str:
    words = ["fluidbench", "eval", metric, "--run", str(run)]
    flags = {**CLI_FLAGS, "seed": "--data-seed", **({"weights": "--clip-weights"} if metric == "clipscore" else {})}
    for key, value in settings.items():
        words += [flags.get(key, "--" + key.replace("_", "-")), str(value)]
    for key, value in sampling.items():
        words += [CLI_FLAGS.get(key, "--" + key.replace("_", "-")), str(value)]
    return shlex.join(words)


def table_columns(spec: Spec) -> list[str]:
    """The results table's columns: every column the report knows, minus metrics this sweep does not measure
    (so the embedded runs.csv has no empty CLIP-score column)."""
    from harness.report import COLUMNS, GENEVAL_COLUMNS, GENEVAL_SE

    dropped = set()
    if not spec.eval.get("fid"):
        dropped.add("fid")
    if not spec.eval.get("geneval"):
        dropped.update([*GENEVAL_COLUMNS, GENEVAL_SE])
    if not spec.eval.get("clipscore"):
        dropped.add("clip_score")
    if not (spec.eval.get("fid") or spec.eval.get("geneval")):
        dropped.update({"seconds_per_image", "forward_passes_per_image"})
    return [c for c in COLUMNS if c not in dropped]


# ---------------------------------------------------------------------------------------------- prep stages
def make_data(spec: Spec, options: dict) -> None:
    """ShapesT2I into SWEEP/data (`fluidbench data shapes`)."""
    from harness.data.shapes import write_shapes

    names = {"train": "n_train", "val": "n_val"}
    write_shapes(spec.data_dir(), **{names.get(k, k): v for k, v in options.items()})


def train_tokenizer(spec: Spec, kind: str, options: dict) -> None:
    """Our own tokenizer on the sweep's data (`fluidbench tokenizer train`, run in this process)."""
    argv = ["tokenizer", "train", "--kind", kind, "--data", str(spec.data_dir()), "--out", str(spec.tokenizer_dir(kind))]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    _cli(argv)


def _cli(argv: list[str]) -> None:
    """A fluidbench command in this process (for commands that have no Python function of their own)."""
    from harness.cli import app

    app(args=argv, prog_name="fluidbench", standalone_mode=False)


def train_features(spec: Spec, options: dict) -> None:
    """The Shapes-FID feature extractor (`fluidbench eval train-features`)."""
    from eval.shapes_features import train_features as train

    train(spec.data_dir(), spec.root / "features", **options)


def tokenizer_ceiling(spec: Spec, kind: str, per_prompt: int, seed: int) -> None:
    """GenEval of true scenes after the tokenizer's round trip: the best score any variant on it can reach."""
    import numpy as np
    import torch

    from eval.detectors import ShapesOracleDetector
    from eval.geneval import score_folder
    from eval.geneval_folder import load_prompts, write_prompt_folder
    from eval.sampling import to_uint8
    from harness.data.shapes import render_prompt
    from variants.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(spec.tokenizer_dir(kind))
    prompts = load_prompts(geneval_prompts(spec))
    folder = spec.root / "tokenizers" / kind / "ceiling"
    scenes = {}
    for index, meta in enumerate(prompts):  # one stream per prompt: the same scenes for every tokenizer
        rng = np.random.default_rng([seed, index])
        scenes[index] = [render_prompt(meta, rng, tokenizer.image_size)[0] for _ in range(per_prompt)]
    with torch.no_grad():
        for index, meta in enumerate(prompts):
            x = torch.from_numpy(np.stack(scenes[index])).permute(0, 3, 1, 2).float() / 127.5 - 1
            write_prompt_folder(folder / "reconstructed", index, meta, to_uint8(tokenizer.decode(tokenizer.encode(x))))
            write_prompt_folder(folder / "true", index, meta, scenes[index])
    detector = ShapesOracleDetector()
    reconstructed = score_folder(folder / "reconstructed", detector, progress=False)
    true = score_folder(folder / "true", detector, progress=False)
    write_json(spec.root / "tokenizers" / kind / "ceiling.json",
               {**reconstructed, "true_scenes_overall": true["overall"], "tokenizer": str(spec.tokenizer_dir(kind)),
                "prompts": str(geneval_prompts(spec)), "per_prompt": per_prompt, "seed": seed})


def geneval_prompts(spec: Spec) -> Path | None:
    """The GenEval prompt file of the sweep: the spec's, else ShapesT2I's own, else None (the official one)."""
    path = (spec.eval.get("geneval") or {}).get("prompts")
    if path:
        return Path(path)
    return spec.data_dir() / "geneval_metadata.jsonl" if spec.data.get("kind") == "shapes" else None


def build_cache(spec: Spec, values: dict) -> None:
    """The cached train and val splits of one token kind (the same cache `fluidbench train` opens)."""
    import torch

    from harness.cache import CachedSplit
    from harness.config import RunConfig
    from harness.runs import load_text_encoder, load_tokenizer

    cfg = RunConfig.from_overrides(values)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer, text_encoder = load_tokenizer(cfg, device), load_text_encoder(cfg, device)
    folders = {split: str(CachedSplit.open(cfg, split, tokenizer, text_encoder).folder) for split in ("train", "val")}
    write_json(spec.root / "cache" / f"{tokenizer.kind}.json", {"folders": folders, "tokenizer": cfg.tokenizer.path})


# ----------------------------------------------------------------------------------------- run stages
def train_run(spec: Spec, values: dict) -> None:
    """One training run (`fluidbench train`); resumes from the run's latest checkpoint if it has one."""
    from harness.config import RunConfig
    from harness.train import train

    train(RunConfig.from_overrides(values))


def _settings(sampling: dict) -> Any:
    from eval.sampling import SamplingSettings

    unknown = set(sampling) - set(SamplingSettings.__dataclass_fields__)
    if unknown:
        raise FluidbenchError(f"sweep spec eval.sampling.{sorted(unknown)[0]}: unknown (known: "
                              f"{', '.join(SamplingSettings.__dataclass_fields__)})")
    return SamplingSettings(**sampling)


def _evaluate(spec: Spec, metric: str, run: str, settings: dict, sampling: dict) -> None:
    """`eval.run_eval.eval_<metric>(RUN, settings=..., **eval_settings(...))`: sample the run's EMA weights,
    score, write RUN/eval/<metric>.json. The spec's keys are that function's keyword arguments."""
    from eval import run_eval

    fn = getattr(run_eval, f"eval_{metric}")
    kwargs = dict(settings)
    problems = eval_setting_problems(metric, kwargs)
    if problems:
        raise FluidbenchError(problems[0])
    fn(Path(run), settings=_settings(sampling), **kwargs)


def eval_setting_problems(metric: str, settings: dict) -> list[str]:
    """Spec keys under eval.<metric> that eval.run_eval.eval_<metric> does not take (loading the spec fails)."""
    import inspect

    from eval import run_eval

    accepted = [k for k in inspect.signature(getattr(run_eval, f"eval_{metric}")).parameters
                if k not in ("run_dir", "settings")]
    return [f"sweep spec eval.{metric}.{key}: not a setting of eval_{metric} (known: {', '.join(accepted)})"
            for key in settings if key not in accepted and key != "ceiling"]


def eval_fid(spec: Spec, run: str, settings: dict, sampling: dict) -> None:
    """FID of the run's samples (`fluidbench eval fid`): Shapes-FID with the sweep's extractor, or COCO-30K."""
    _evaluate(spec, "fid", run, settings, sampling)


def eval_geneval(spec: Spec, run: str, settings: dict, sampling: dict) -> None:
    """GenEval of the run (`fluidbench eval geneval`) on the sweep's prompt file."""
    _evaluate(spec, "geneval", run, settings, sampling)


def eval_clipscore(spec: Spec, run: str, settings: dict, sampling: dict) -> None:
    """CLIP score of the run's samples against their captions (`fluidbench eval clipscore`)."""
    _evaluate(spec, "clipscore", run, settings, sampling)


def sample_grid(spec: Spec, run: str, prompts: list[str], per_prompt: int, seed: int, sampling: dict) -> None:
    """RUN/eval/samples.png: one row of `per_prompt` samples per fixed prompt, the same seeds for every run."""
    from eval.geneval_folder import png_bytes
    from eval.sampling import SamplingSettings, generate, image_grid
    from harness.atomic import write_bytes
    from harness.runs import load_run

    loaded = load_run(Path(run))
    settings = _settings({**sampling, "seed": seed, "batch_size": len(prompts) * per_prompt})
    captions = [p for p in prompts for _ in range(per_prompt)]
    images = [image for _, image in generate(loaded, captions, settings, progress=False)]
    out = Path(run) / "eval"
    write_json(out / "samples.json", {"prompts": prompts, "per_prompt": per_prompt,
                                      "settings": settings.resolved(loaded.variant)})
    scale = max(1, 96 // images[0].shape[0])  # 32 px samples drawn 3x (nearest: every pixel kept) to be seen
    images = [image.repeat(scale, axis=0).repeat(scale, axis=1) for image in images]
    write_bytes(out / "samples.png", png_bytes(image_grid(images, ncols=per_prompt)))


def make_report(spec: Spec, columns: list[str], offset: bool, n_boot: int) -> None:
    """The results table from the run folders, then report.md and the plots (`fluidbench report`)."""
    from harness.report import collect_runs, write_report, write_table

    table = collect_runs(spec.root)
    write_table(table, spec.root, columns)
    write_report(spec.root, table=table[[c for c in table.columns if c in columns]], offset=offset, n_boot=n_boot)
