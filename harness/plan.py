"""The plan of a sweep: a typed spec -> the ordered list of its typed jobs (harness/jobs.py).

Prep jobs (data, tokenizers, caches, the Shapes-FID extractor, tokenizer ceilings), then per size (smallest
first) each variant's training run and its evaluations, then the report: a local sweep stopped early has
complete rows for every variant at the sizes it reached. Every job's config is constructed and validated here,
so a bad value fails before any job runs (and under --dry-run too).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from eval.metrics import METRICS, unmeasured_columns
from harness.data import profile
from harness.errors import FluidbenchError
from harness.jobs import (BuildCache, Evaluate, Job, MakeData, MakeReport, SampleGrid, TokenizerCeiling, TrainCell,
                          TrainFeatures, TrainRun, TrainTokenizer)
from harness.schema import build, given
from harness.spec import TOKEN_KINDS, Spec, order_kind, token_kind


def plan(spec: Spec) -> list[Job]:
    """Every job of the sweep in an order that respects the dependencies, each with its settings key."""
    try:
        jobs = _jobs(spec)
    except FluidbenchError as e:
        raise FluidbenchError(f"sweep {spec.name}: {e}") from None
    names = set()
    for job in jobs:
        missing = [d for d in job.deps if d not in names]
        if missing:
            raise AssertionError(f"job {job.name} planned before its dependency {missing[0]}")
        names.add(job.name)
        job.key = job.key or job_key(job, spec.root)
    return jobs


def job_key(job: Job, root: Path) -> str:
    """A hash of the job's stage and plain values; paths inside the sweep folder count relative to it, so a
    moved sweep, or one named by an absolute path instead of a relative one, keeps its keys."""
    args = json.dumps(job.args, sort_keys=True, default=str).replace(str(root), "$SWEEP")
    return hashlib.sha256(json.dumps([job.stage, args], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jobs(spec: Spec) -> list[Job]:
    jobs: list[Job] = []
    prep, evaluation = spec.resources_for("prep"), spec.resources_for("eval")
    data_deps = []
    if not spec.data.path:
        jobs.append(MakeData(name="data", out=str(spec.data_dir()), options=spec.data.shapes,
                             outputs=[str(spec.data_dir() / "manifest.json")], resources=prep))
        data_deps = ["data"]

    kinds = [k for k in TOKEN_KINDS if any(token_kind(v) == k for v, _ in spec.runs())]
    tok_deps: dict[str, list[str]] = {}
    for kind in kinds:
        tok = spec.tokenizers[kind]
        tok_deps[kind] = []
        if tok.path:
            continue
        out = spec.tokenizer_dir(kind)
        jobs.append(TrainTokenizer(name=f"tokenizer/{kind}", kind=kind, data=str(spec.data_dir()), out=str(out),
                                   options=tok.train, outputs=[str(out / "metrics.json")], deps=data_deps,
                                   resources=prep))
        tok_deps[kind] = [f"tokenizer/{kind}"]

    made_by = dict(tok_deps)  # the tokenizer job of each kind (the ceilings need no cache)
    # Tokens and text of the training data, encoded once per token kind before any run reads them, so runs
    # side by side never build the same cache twice (and 256 GPUs never wait on one rank encoding it).
    for kind in kinds:
        variant = next(v for v, _ in spec.runs() if token_kind(v) == kind)
        values = run_config_values(spec, variant, next(s for v, s in spec.runs() if v == variant))
        values = {k: v for k, v in values.items() if k.startswith(("data.", "tokenizer.", "text."))}  # the key
        jobs.append(BuildCache(name=f"cache/{kind}", kind=kind, values=values, sweep=spec.name,
                               outputs=[str(spec.root / "cache" / f"{kind}.json")], deps=data_deps + tok_deps[kind],
                               resources=prep))
        tok_deps[kind] = tok_deps[kind] + [f"cache/{kind}"]

    feature_deps = []
    if "fid" in spec.eval.metrics and profile(spec.data.kind).trains_extractor:  # Shapes-FID: trained on the data
        out = spec.root / "features"
        jobs.append(TrainFeatures(name="features", data=str(spec.data_dir()), out=str(out), options=spec.features,
                                  outputs=[str(out / "manifest.json")], deps=data_deps, resources=prep))
        feature_deps = ["features"]
    ceiling_jobs = []
    geneval = spec.eval.metrics.get("geneval")
    if geneval is not None and spec.eval.ceiling:
        for kind in kinds:
            out = spec.root / "tokenizers" / kind / "ceiling.json"
            jobs.append(TokenizerCeiling(name=f"ceiling/{kind}", kind=kind, tokenizer=str(spec.tokenizer_dir(kind)),
                                         prompts=str(geneval_prompts(spec)), data=str(spec.data_dir()),
                                         per_prompt=geneval.per_prompt,
                                         seed=0, sweep=spec.name,
                                         detector=geneval.detector or "shapes-oracle", outputs=[str(out)],
                                         deps=data_deps + made_by[kind], resources=prep))
            ceiling_jobs.append(f"ceiling/{kind}")

    result_jobs = list(ceiling_jobs)
    if spec.isoflop is not None:  # the grid is the design's cells, smallest budget first (harness/isoflop.py)
        cells = _cell_jobs(spec, tok_deps)
        jobs += cells
        result_jobs += [j.name for j in cells]
    extra = [(r.variant, r.size) for r in spec.extra_runs]
    sizes = list(dict.fromkeys([s for s in spec.sizes] + [r.size for r in spec.extra_runs]))
    for size in sizes:
        for variant in dict.fromkeys(spec.variants + [r.variant for r in spec.extra_runs]):
            if (variant, size) not in spec.runs() or (spec.isoflop is not None and (variant, size) not in extra):
                continue
            for seed in [0, *spec.extra_seeds(variant, size)]:
                run_jobs = _run_jobs(spec, variant, size, data_deps + tok_deps[token_kind(variant)], feature_deps,
                                     evaluation, seed)
                jobs += run_jobs
                result_jobs += [j.name for j in run_jobs]

    outputs = [str(spec.root / name) for name in ("runs.csv", "runs.parquet", "report.md")]
    jobs.append(MakeReport(name="report", root=str(spec.root), columns=table_columns(spec), offset=spec.report.offset,
                           n_boot=spec.report.n_boot, outputs=outputs, deps=result_jobs,
                           resources=spec.resources_for("report"), **_compute_optimal(spec)))
    return jobs


def _cell_jobs(spec: Spec, deps: dict[str, list[str]]) -> list[Job]:
    """One TrainCell per cell of the IsoFLOP design: a normal run whose steps spend the cell's budget; `deps`:
    the jobs each token kind's runs wait for (its tokenizer and cache)."""
    from harness.isoflop import cell_dir, cells, shapes

    jobs: list[Job] = []
    for cell in cells(spec):
        values = {**run_config_values(spec, cell.variant, cell.size), "out": str(cell_dir(spec, cell)),
                  "train.steps": cell.steps}
        try:
            jobs.append(TrainCell(name=f"train/{cell.name}", values=values, cell=cell.record(), shapes=shapes(spec),
                                  outputs=[str(cell_dir(spec, cell) / "summary.json")],
                                  deps=deps[token_kind(cell.variant)], resources=spec.resources_for("train", cell.size)))
        except FluidbenchError as e:
            raise FluidbenchError(f"train/{cell.name}: {e}") from None
    return jobs


def _compute_optimal(spec: Spec) -> dict:
    """The report's compute-optimal options, set only where they do something (so other sweeps keep their
    report key)."""
    if spec.isoflop is None and not spec.report.intermediate:
        return {}
    return {"intermediate": spec.report.intermediate, "fit_boot": spec.report.fit_boot}


def run_config_values(spec: Spec, variant: str, size: str, seed: int = 0) -> dict:
    """Every RunConfig value the sweep sets for one run (dotted keys): spec values, then the run's identity;
    seed k > 0 of a rung trains with train.seed + k (weights, data order, loss draws) into its own folder."""
    values = spec.run_values(size, variant)
    if seed:
        values["train.seed"] = int(values.get("train.seed", 0)) + seed
    values.update({"out": str(spec.seed_run_dir(variant, size, seed)), "data.path": str(spec.data_dir()),
                   "data.kind": spec.data.kind, "tokenizer.path": str(spec.tokenizer_dir(token_kind(variant))),
                   "model.variant": variant, "model.size": size, "model.ladder": spec.ladder})
    values.update({f"text.{k}": v for k, v in given(spec.text).items()})
    values.update({f"data.{k}": v for k, v in given(spec.data).items() if k not in ("kind", "path", "shapes")})
    return values


def _run_jobs(spec: Spec, variant: str, size: str, deps: list[str], feature_deps: list[str],
              evaluation: Any, seed: int = 0) -> list[Job]:
    run = str(spec.seed_run_dir(variant, size, seed))
    name = Path(run).name
    try:
        jobs: list[Job] = [TrainRun(name=f"train/{name}", values=run_config_values(spec, variant, size, seed),
                                    outputs=[str(Path(run) / "summary.json")], deps=deps,
                                    resources=spec.resources_for("train", size))]
    except FluidbenchError as e:
        raise FluidbenchError(f"train/{name}: {e}") from None
    for metric, typed in spec.eval.metrics.items():
        if METRICS[metric].orders and order_kind(variant) not in METRICS[metric].orders:
            continue
        settings = build(METRICS[metric].settings, eval_settings(spec, metric, bool(feature_deps)), f"eval.{metric}",
                         owner=f"eval_{metric}")
        jobs.append(Evaluate(name=f"eval/{metric}/{name}", metric=metric, run_dir=run, settings=settings,
                             sampling=spec.eval.sampling, outputs=[str(Path(run) / "eval" / METRICS[metric].result)],
                             deps=[f"train/{name}"] + (feature_deps if metric == "fid" else [])
                             + [f"eval/{m}/{name}" for m in METRICS[metric].after if m in spec.eval.metrics],
                             resources=evaluation))
    if spec.eval.grid is not None:
        jobs.append(SampleGrid(name=f"eval/grid/{name}", run_dir=run, grid=spec.eval.grid, sampling=spec.eval.sampling,
                               outputs=[str(Path(run) / "eval" / "samples.png")], deps=[f"train/{name}"],
                               resources=evaluation))
    return jobs


def eval_settings(spec: Spec, metric: str, own_features: bool) -> dict:
    """The settings of one metric for this sweep (plain values): the spec's, plus the sweep's own Shapes-FID
    extractor and reference cache, and its GenEval prompt file."""
    settings = given(spec.eval.metrics[metric])
    if metric == "fid" and own_features:
        settings.setdefault("weights", str(spec.root / "features"))
        settings.setdefault("cache_dir", str(spec.root / "fid-ref"))
    if metric == "geneval" and geneval_prompts(spec) is not None:
        settings.setdefault("prompts", str(geneval_prompts(spec)))
    return settings


def geneval_prompts(spec: Spec) -> Path | None:
    """The GenEval prompt file of the sweep: the spec's, else ShapesT2I's own, else None (the official one)."""
    geneval = spec.eval.metrics.get("geneval")
    if geneval is not None and geneval.prompts:
        return Path(geneval.prompts)
    return profile(spec.data.kind).prompts(spec.data_dir())


def table_columns(spec: Spec) -> list[str]:
    """The results table's columns: every column the report knows, minus metrics this sweep does not measure
    (so the embedded runs.csv has no empty CLIP-score column)."""
    from harness.results import COLUMNS

    dropped = set(unmeasured_columns(list(spec.eval.metrics)))
    if spec.isoflop is None:
        dropped.add("budget")
    return [c for c in COLUMNS if c not in dropped]
