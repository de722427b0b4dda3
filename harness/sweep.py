"""Sweeps: a spec (variants x sizes, data, tokenizers, evaluation, resources) -> a plan of jobs -> an executor.

A spec is a YAML file: the shipped ones live in harness/specs/ (`embedded`, `fluid-paper`), any other path works
too. `plan(spec)` turns it into an ordered list of `Job`s (data, tokenizers, Shapes-FID features, tokenizer
ceilings, one training job per (variant, size), its evaluations, the report), each naming the stage function
(harness/stages.py) that does the work, the files that prove it done, the jobs it waits for and the resources
it needs on a cluster. Executors: harness/local.py runs them on this machine (one at a time in this process,
or a few side by side in worker processes); harness/slurm.py submits them through submitit with Slurm
dependencies.

Idempotent: a job whose outputs exist and whose stamp (SWEEP/.stages/<job>.json, written when it finishes)
carries the same settings key is skipped; a training job that did not finish resumes from its run's latest
checkpoint (the trainer does that by itself); so killing a sweep and starting it again loses no finished work.
A job whose settings changed since it ran is an error naming the folder to delete, never a silent mix.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from harness.atomic import append_jsonl, read_jsonl, write_json
from harness.errors import FluidbenchError

SPECS_DIR = Path(__file__).parent / "specs"
TOKEN_KINDS = ("vq", "kl")


# ------------------------------------------------------------------------------------------------------ spec
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

    @property
    def tasks_per_node(self) -> int:
        return max(self.gpus_per_node, 1)


@dataclass
class Spec:
    """A sweep: what to train, on what, how to evaluate it, with what resources. Fields mirror the YAML."""

    name: str
    out: str                                        # the sweep folder (results/<name>)
    data: dict                                      # kind, path | shapes: {seed, train, val, size}
    tokenizers: dict[str, dict]                     # kind -> {path: DIR} | {train: {option: value}}
    text: dict                                      # RunConfig `text` section: encoder, path, max_length
    ladder: str                                     # cpu | paper
    variants: list[str]
    sizes: list[str]
    extra_runs: list[dict] = field(default_factory=list)   # [{variant, size}] beyond the grid
    run: dict = field(default_factory=dict)         # RunConfig values for every run (nested or dotted keys)
    per_size: dict[str, dict] = field(default_factory=dict)   # size -> RunConfig values over `run`
    features: dict = field(default_factory=dict)    # Shapes-FID extractor training options
    eval: dict = field(default_factory=dict)        # fid, geneval, clipscore, grid, sampling
    resources: dict = field(default_factory=dict)   # default, prep, train (per size), eval, report
    cluster: dict = field(default_factory=dict)     # GPU model numbers for the scale plan
    local: dict = field(default_factory=dict)       # local executor: workers, threads, exclusive (harness/local.py)
    report: dict = field(default_factory=dict)      # offset (fit + c), n_boot (bootstrap resamples)
    note: str = ""

    @property
    def root(self) -> Path:
        return Path(self.out)

    def data_dir(self) -> Path:
        return Path(self.data["path"]) if self.data.get("path") else self.root / "data"

    def tokenizer_dir(self, kind: str) -> Path:
        tok = self.tokenizers[kind]
        return Path(tok["path"]) if tok.get("path") else self.root / "tokenizers" / kind

    def run_dir(self, variant: str, size: str) -> Path:
        return self.root / "runs" / f"{variant}-{size}"

    def runs(self) -> list[tuple[str, str]]:
        """(variant, size) of every training run: the grid, then the extra runs."""
        grid = [(v, s) for v in self.variants for s in self.sizes]
        extra = [(r["variant"], r["size"]) for r in self.extra_runs]
        return grid + [r for r in extra if r not in grid]

    def run_values(self, size: str) -> dict:
        """The spec's RunConfig values for one rung: `run`, then `per_size[size]`."""
        return {**_flatten(self.run), **_flatten(self.per_size.get(size, {}))}

    def resources_for(self, kind: str, size: str | None = None) -> Resources:
        """Resources of a job kind (prep, train, eval, report), per size for training when the spec says so."""
        section = self.resources.get(kind, {})
        if kind == "train" and size is not None:
            section = {**section.get("default", {}), **section.get(size, {})}
        return _resources({**self.resources.get("default", {}), **section}, f"resources.{kind}")


def _flatten(values: dict, prefix: str = "") -> dict:
    """Nested RunConfig values -> dotted keys (model.options stays a mapping below its own keys)."""
    out = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not dotted.startswith("model.options."):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _resources(values: dict, where: str) -> Resources:
    known = set(Resources.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise FluidbenchError(f"sweep spec {where}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(known))})")
    return Resources(**values)


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
    """Read and check a spec; `out` overrides its output folder."""
    import yaml

    path = spec_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FluidbenchError(f"sweep spec {path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(values, dict):
        raise FluidbenchError(f"sweep spec {path}: expected a mapping at the top level")
    known = set(Spec.__dataclass_fields__)
    for key in values:
        if key not in known:
            raise FluidbenchError(f"sweep spec {path}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    values.setdefault("out", f"results/{values.get('name', path.stem)}")
    for key in ("name", "data", "tokenizers", "text", "ladder", "variants", "sizes"):
        if key not in values:
            raise FluidbenchError(f"sweep spec {path}: missing key {key!r}")
    spec = Spec(**values)
    if out is not None:
        spec.out = str(out)
    check_spec(spec, str(path))
    return spec


def check_spec(spec: Spec, where: str) -> None:
    """Fail before any work on names the registry or the ladder do not know, or a missing tokenizer."""
    from variants.registry import LADDERS, VARIANTS

    if spec.ladder not in LADDERS:
        raise FluidbenchError(f"sweep spec {where}: ladder {spec.ladder!r} unknown (expected one of {', '.join(LADDERS)})")
    rungs = [r.name for r in LADDERS[spec.ladder]]
    for variant, size in spec.runs():
        if variant not in VARIANTS:
            raise FluidbenchError(f"sweep spec {where}: variant {variant!r} unknown (expected one of {', '.join(VARIANTS)})")
        if size not in rungs:
            raise FluidbenchError(f"sweep spec {where}: size {size!r} not in the {spec.ladder} ladder ({', '.join(rungs)})")
        kind = token_kind(variant)
        if kind not in spec.tokenizers:
            raise FluidbenchError(f"sweep spec {where}: tokenizers.{kind} missing (needed by {variant})")
    for kind, tok in spec.tokenizers.items():
        if kind not in TOKEN_KINDS or not isinstance(tok, dict) or not ({"path", "train"} & set(tok)):
            raise FluidbenchError(f"sweep spec {where}: tokenizers.{kind}: expected vq|kl with `path: DIR` or `train: {{...}}`")
    if not spec.data.get("path") and "shapes" not in spec.data:
        raise FluidbenchError(f"sweep spec {where}: data needs `path: DIR` or `shapes: {{...}}` to generate ShapesT2I")
    for size in spec.per_size:
        if size not in rungs:
            raise FluidbenchError(f"sweep spec {where}: per_size.{size}: not in the {spec.ladder} ladder ({', '.join(rungs)})")
    from harness.stages import EVAL_METRICS, eval_setting_problems

    for metric in EVAL_METRICS:  # a misspelt evaluation key fails now, not after the training it waits for
        problems = eval_setting_problems(metric, spec.eval.get(metric) or {})
        if problems:
            raise FluidbenchError(f"{problems[0]} ({where})")


def token_kind(variant: str) -> str:
    """The token kind ("vq" | "kl") a variant consumes, from the registry (the harness never parses names)."""
    from variants.registry import VARIANTS

    return VARIANTS[variant][1].token_kind


# ------------------------------------------------------------------------------------------------------ plan
@dataclass
class Job:
    """One unit of work: a stage function with its arguments, the files that prove it done, what it waits for."""

    name: str                        # unique, path-like: "train/kl-random-S", "eval/fid/kl-random-S"
    stage: str                       # function name in harness/stages.py
    args: dict                       # keyword arguments of the stage (plain JSON values)
    outputs: list[str]               # files; all present (+ a matching stamp) = done
    deps: list[str] = field(default_factory=list)
    resources: Resources = field(default_factory=Resources)
    command: str = ""                # the equivalent fluidbench command line, for people and --dry-run
    key: str = ""                    # hash of everything that decides the result

    def to_dict(self) -> dict:
        return asdict(self)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(spec: Spec) -> list[Job]:
    """Every job of the sweep in an order that respects the dependencies."""
    from harness import stages

    jobs = stages.plan_jobs(spec)
    for job in jobs:
        # paths inside the sweep folder count relative to it: a moved sweep, or one named by an absolute
        # path instead of a relative one, keeps its keys
        args = json.dumps(job.args, sort_keys=True, default=str).replace(str(spec.root), "$SWEEP")
        job.key = job.key or _key(job.stage, args)
    names = set()
    for job in jobs:
        missing = [d for d in job.deps if d not in names]
        if missing:
            raise AssertionError(f"job {job.name} planned before its dependency {missing[0]}")
        names.add(job.name)
    return jobs


# -------------------------------------------------------------------------------------------- bookkeeping
def stamp_path(spec: Spec, job: Job) -> Path:
    return spec.root / ".stages" / f"{job.name.replace('/', '__')}.json"


def is_done(spec: Spec, job: Job) -> bool:
    """Outputs present and the stamp (if any) written for the same settings; stale settings are an error."""
    if not all(Path(o).exists() for o in job.outputs):
        return False
    stamp = stamp_path(spec, job)
    if stamp.is_file():
        recorded = json.loads(stamp.read_text()).get("key")
        if recorded != job.key:
            where = Path(job.outputs[0]).parent
            raise FluidbenchError(f"sweep job {job.name} finished earlier with other settings (stamp {stamp}); "
                                  f"delete {where} and {stamp} to redo it, or give the sweep another `out`")
    return True


def log_event(spec: Spec, event: str, job: str, **extra: Any) -> None:
    """One line per job event in SWEEP/sweep.log.jsonl: what ran, what was skipped, how long it took."""
    spec.root.mkdir(parents=True, exist_ok=True)
    append_jsonl(spec.root / "sweep.log.jsonl", {"time": time.time(), "event": event, "job": job, **extra})


def read_log(spec: Spec) -> list[dict]:
    path = spec.root / "sweep.log.jsonl"
    return read_jsonl(path) if path.is_file() else []


def run_job(spec: Spec, job: Job) -> None:
    """Run one job's stage in this process and stamp it done (the same call on a laptop or a Slurm node)."""
    from harness import stages

    with job_lock(spec, job):
        t0, cpu0 = time.time(), time.process_time()
        getattr(stages, job.stage)(spec, **job.args)
        missing = [o for o in job.outputs if not Path(o).exists()]
        if missing:
            raise FluidbenchError(f"sweep job {job.name} stopped without writing {missing[0]} (interrupted? run "
                                  "the sweep again to resume)")
        stamp(spec, job, time.time() - t0, cpu_s=time.process_time() - cpu0)


@contextmanager
def job_lock(spec: Spec, job: Job) -> Iterator[None]:
    """An exclusive lock per job, so two sweeps on one folder (or an orphaned worker) never run it twice."""
    import fcntl

    path = stamp_path(spec, job).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FluidbenchError(f"sweep job {job.name} is running in another process (lock {path})") from None
        except OSError:
            pass  # a file system without flock: run unlocked
        yield


def stamp(spec: Spec, job: Job, seconds: float, cpu_s: float | None = None) -> None:
    """Record that `job` finished with its current settings key (and its wall and CPU seconds, for budgets)."""
    write_json(stamp_path(spec, job), {"job": job.name, "key": job.key, "seconds": round(seconds, 1),
                                       "cpu_s": None if cpu_s is None else round(cpu_s, 1),
                                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


def write_snapshot(spec: Spec) -> None:
    """SWEEP/sweep.json: the resolved spec the results came from (the report reads its name and note)."""
    write_json(spec.root / "sweep.json", asdict(spec))


# ------------------------------------------------------------------------------------------------ dry run
def describe(spec: Spec, jobs: list[Job], executor: str) -> str:
    """The dry run: every job with its state, resources (Slurm) and command."""
    lines = [f"sweep {spec.name}: {len(jobs)} jobs, {sum(j.stage == 'train_run' for j in jobs)} training runs, "
             f"out {spec.root}, executor {executor}"]
    for job in jobs:
        state = "done" if is_done(spec, job) else "todo"
        r = job.resources
        where = (f"{r.nodes} node(s) x {r.gpus_per_node} GPU, {r.tasks_per_node} task(s)/node, "
                 f"{r.cpus_per_task} cpu/task, {r.mem_gb} GB, {r.time_min} min"
                 + (f", partition {r.partition}" if r.partition else ""))
        lines.append(f"{job.name}  [{state}]")
        lines.append(f"    resources: {where if executor == 'slurm' else 'this machine, in this process'}")
        if job.deps:
            kind = "afterany" if job.stage == "make_report" else "afterok"
            deps = job.deps if len(job.deps) <= 6 else job.deps[:3] + [f"... {len(job.deps) - 3} more"]
            lines.append(f"    after:     {', '.join(deps)} ({kind})")
        lines.append(f"    command:   {job.command}")
    return "\n".join(lines)
