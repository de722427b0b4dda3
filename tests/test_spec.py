"""A sweep spec is checked at load: a misspelt or ill-typed key at any level is one line naming its path, before
any job runs (also under --dry-run); every job of the plan is typed and carries a constructed config."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from harness.errors import FluidbenchError
from harness.sweep import load_spec, plan

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = yaml.safe_load((ROOT / "harness/specs/embedded.yaml").read_text())
PAPER = yaml.safe_load((ROOT / "harness/specs/fluid-paper.yaml").read_text())


def _set(values: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(values)
    *parents, last = dotted.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


# (base spec, dotted key to set, value, text the error must contain: the key's path)
BAD = [
    (EMBEDDED, "frobnicate", 1, "unknown key 'frobnicate'"),
    (EMBEDDED, "run.train.batch_sise", 64, "run.train.batch_sise"),
    (EMBEDDED, "run.optim.lrr", 1e-3, "run.optim.lrr"),
    (EMBEDDED, "run.train.steps", "many", "run.train.steps"),
    (EMBEDDED, "per_size.cpu-s.train.stepz", 3, "per_size.cpu-s.train.stepz"),
    (EMBEDDED, "per_size.cpu-huge", {"train": {"steps": 3}}, "per_size.cpu-huge"),
    (EMBEDDED, "eval.sampling.head_stepz", 20, "eval.sampling.head_stepz"),
    (EMBEDDED, "eval.sampling.steps", "16", "eval.sampling.steps: expected int"),
    (EMBEDDED, "eval.fid.nn", 500, "eval.fid.nn: not a setting of eval_fid"),
    (EMBEDDED, "eval.fid.n", 1.5, "eval.fid.n: expected int"),
    (EMBEDDED, "eval.geneval.per_promt", 2, "eval.geneval.per_promt: not a setting of eval_geneval"),
    (EMBEDDED, "eval.geneval.ceiling", "yes", "eval.geneval.ceiling: expected bool"),
    (EMBEDDED, "eval.kid", {"n": 3}, "unknown key 'eval.kid'"),
    (EMBEDDED, "eval.grid.per_promt", 4, "eval.grid.per_promt"),
    (EMBEDDED, "local.workers", "abc", "local.workers: expected int, got str 'abc'"),
    (EMBEDDED, "local.worker", 2, "local.worker"),
    (EMBEDDED, "local.workers", 0, "local: workers and threads must be >= 1"),
    (EMBEDDED, "ladder", "gpu", "ladder 'gpu' unknown"),
    (EMBEDDED, "variants", "kl-random", "variants: expected a list, got str 'kl-random'"),
    (EMBEDDED, "variants", ["kl-randum"], "variant 'kl-randum' unknown"),
    (EMBEDDED, "extra_runs", [{"variant": "kl-random", "sise": "cpu-s"}], "extra_runs[0].sise"),
    (EMBEDDED, "data.shapes.trian", 10, "data.shapes.trian"),
    (EMBEDDED, "data.shapes.align", 3, "data.shapes: align must be one of 0, 1, 2, 4, 8"),
    (EMBEDDED, "data.val_n", "all", "data.val_n: expected int"),
    (EMBEDDED, "data.kind", "jpegs", "data.kind='jpegs'"),
    (EMBEDDED, "tokenizers.vq.train.stepz", 3, "tokenizers.vq.train.stepz"),
    (EMBEDDED, "tokenizers.vq", {"pth": "/x"}, "tokenizers.vq.pth"),
    (EMBEDDED, "text.max_lenght", 32, "text.max_lenght"),
    (EMBEDDED, "features.step", 600, "features.step"),
    (EMBEDDED, "report.n_boot", "1000x", "report.n_boot: expected int"),
    (PAPER, "resources.train.gpuz", 8, "resources.train.gpuz"),
    (PAPER, "resources.train.166M.gpus", 8, "resources.train.166M.gpus"),
    (PAPER, "resources.eval.time_min", "1 day", "resources.eval.time_min: expected int"),
    (PAPER, "resources.gpu", {"nodes": 1}, "unknown key 'resources.gpu'"),
    (PAPER, "cluster.mfuu", 0.4, "cluster.mfuu"),
    (PAPER, "eval.clipscore.weigths", "/x", "eval.clipscore.weigths: not a setting of eval_clipscore"),
    (PAPER, "run.dist.strategy", "zero3", "dist.strategy='zero3'"),
]


@pytest.mark.parametrize("base,key,value,expected", BAD, ids=[f"{k}={v!r}" for _, k, v, _ in BAD])
def test_a_bad_key_at_any_level_fails_at_load_naming_its_path(tmp_path, base, key, value, expected):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_set(base, key, value)))
    with pytest.raises(FluidbenchError) as error:
        plan(load_spec(path, out=tmp_path / "sweep"))  # the plan constructs every config too
    message = str(error.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("key,value,expected", [("eval.sampling.head_stepz", 20, "eval.sampling.head_stepz"),
                                                ("run.train.batch_sise", 64, "run.train.batch_sise")])
def test_dry_run_catches_a_bad_key_with_one_line_and_exit_2(tmp_path, capsys, key, value, expected):
    from harness.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_set(EMBEDDED, key, value)))
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "sweep")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: sweep spec") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_every_job_is_typed_with_its_config_constructed(tmp_path):
    from eval.metrics import METRICS
    from harness.config import RunConfig
    from harness.jobs import Evaluate, TrainRun

    jobs = plan(load_spec("embedded", out=tmp_path / "e"))
    runs = [j for j in jobs if isinstance(j, TrainRun)]
    # 4 variants x 4 rungs + a second seed of each at cpu-2xs (docs/recipe.md, section 5)
    assert len(runs) == 20 and all(isinstance(j.cfg, RunConfig) for j in runs)
    assert runs[0].cfg.train.steps == 800 and runs[0].cfg.optim.lr == 4.4e-2
    assert sum(j.cfg.train.seed == 1 for j in runs) == 4
    evals = [j for j in jobs if isinstance(j, Evaluate)]
    assert {j.metric for j in evals} == {"fid", "geneval", "context"}  # clipscore: null in the embedded spec
    context = [j for j in evals if j.metric == "context"]  # random order only (eval/metrics.py, CONTEXT.orders)
    assert len(context) == 10 and all("-random-" in j.name for j in context)
    lr = {(j.cfg.model.variant, j.cfg.model.size): j.cfg.lr() for j in runs if j.cfg.train.seed == 0}
    assert lr["vq-random", "cpu-s"] == pytest.approx(lr["vq-raster", "cpu-s"] / 4)  # per_variant lr_scale
    assert lr["kl-random", "cpu-s"] == lr["vq-raster", "cpu-s"] == 1.1e-2
    for job in evals:
        assert isinstance(job.settings, METRICS[job.metric].settings)
        assert job.sampling.head_steps == 20 and job.outputs[0].endswith(METRICS[job.metric].result)
    fid = next(j for j in evals if j.metric == "fid")
    assert fid.settings.n == 500 and fid.settings.weights == str(tmp_path / "e" / "features")
    assert len({j.key for j in jobs}) == len(jobs)


def test_the_command_line_of_an_evaluation_is_one_the_cli_takes(tmp_path):
    """Every flag an evaluation job writes is an option of `fluidbench eval <metric>` (they cannot drift)."""
    import shlex

    import typer

    from harness.cli import app
    from harness.jobs import Evaluate

    group = typer.main.get_command(app).commands["eval"]
    for spec in ("embedded", "fluid-paper"):
        for job in [j for j in plan(load_spec(spec, out=tmp_path / spec)) if isinstance(j, Evaluate)]:
            words = shlex.split(job.command)
            assert words[:3] == ["fluidbench", "eval", job.metric]
            command = group.commands[job.metric]
            context = command.make_context(job.metric, words[3:])  # parses, or raises on an unknown option
            assert context.params["run"] == Path(job.run_dir)


def test_a_missing_section_is_named():
    values = {k: v for k, v in EMBEDDED.items() if k != "tokenizers"}
    with pytest.raises(FluidbenchError, match="missing key 'tokenizers'"):
        from harness.schema import build
        from harness.spec import Spec

        build(Spec, values, "")


def test_a_new_metric_is_one_registry_entry(tmp_path, monkeypatch):
    """One Metric entry (settings type + function) gives the spec key, the sweep job with its command line, the
    CLI command and the table columns."""
    import dataclasses
    import json

    import typer
    from typer.testing import CliRunner

    from eval import metrics
    from eval.settings import flag
    from harness.commands.eval_run import command
    from harness.jobs import Evaluate

    @dataclasses.dataclass
    class ToySettings:
        n: int = flag(10, "--n", help="Samples.")

    def toy(run_dir, settings, sampling, **extra):
        result = {"toy": settings.n * 0.5, "sampling_stats": {"seconds_per_image": 0.25}}
        (Path(run_dir) / "eval").mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "eval" / "toy.json").write_text(json.dumps(result))
        return result

    toy_metric = metrics.Metric("toy", toy, ToySettings, "toy.json", ("toy",), lambda r: {"toy": r.get("toy")},
                                lambda r: f"toy={r['toy']}", "A toy metric.", lambda s: s.n)
    monkeypatch.setitem(metrics.METRICS, "toy", toy_metric)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(_set(EMBEDDED, "eval.toy", {"n": 7})))
    jobs = [j for j in plan(load_spec(path, out=tmp_path / "e")) if isinstance(j, Evaluate) and j.metric == "toy"]
    # one per training run of the embedded spec (4 variants x 4 rungs + 4 second seeds)
    assert len(jobs) == 20 and jobs[0].settings.n == 7 and jobs[0].outputs[0].endswith("eval/toy.json")
    assert " --n 7 " in jobs[0].command + " "
    path.write_text(yaml.safe_dump(_set(EMBEDDED, "eval.toy", {"m": 7})))
    with pytest.raises(FluidbenchError, match="eval.toy.m: not a setting of eval_toy"):
        load_spec(path)

    app = typer.Typer()
    app.command("toy")(command(toy_metric))
    app.command("other")(lambda: None)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["toy", "--run", str(run), "--n", "4"])
    assert result.exit_code == 0, result.output
    assert "toy=2.0" in result.output
    row = metrics.table_row(run, lambda p: json.loads(p.read_text()) if p.is_file() else {})
    assert row["toy"] == 2.0


def test_option_types_default_to_what_their_functions_default_to():
    """A job passes every field of its options type, so a field's default must be its function's (no drift)."""
    import dataclasses
    import inspect

    import typer

    from eval.metrics import METRICS
    from eval.run_eval import eval_clipscore, eval_fid, eval_geneval
    from eval.shapes_features import train_features
    from harness.cli import app
    from harness.data.shapes import write_shapes
    from harness.spec import FeatureOptions, ShapesOptions
    from harness.tokenizer_folder import TokenizerTrainOptions

    def defaults(fn, rename=None):
        rename = rename or {}
        return {rename.get(k, k): p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}

    def fields(cls):
        return {f.name: f.default for f in dataclasses.fields(cls)}

    assert fields(FeatureOptions).items() <= defaults(train_features).items()
    assert fields(ShapesOptions).items() <= defaults(write_shapes, {"n_train": "train", "n_val": "val"}).items()
    for name, fn in (("fid", eval_fid), ("geneval", eval_geneval), ("clipscore", eval_clipscore)):
        assert fields(METRICS[name].settings).items() <= defaults(fn).items(), name
    train = typer.main.get_command(app).commands["tokenizer"].commands["train"]
    cli = {p.name: p.default for p in train.params if p.name not in ("kind", "data", "out")}
    assert cli == fields(TokenizerTrainOptions)


def test_every_job_command_line_parses_as_the_cli(tmp_path):
    """Every job that prints a plain `fluidbench ...` line prints one the CLI accepts: options and arguments
    parse (training overrides are then checked by RunConfig, as `fluidbench train` does)."""
    import shlex

    import typer

    from harness.cli import app
    from harness.config import RunConfig
    from harness.jobs import TrainRun

    root = typer.main.get_command(app)
    parsed = set()
    for spec in ("embedded", "fluid-paper"):
        for job in plan(load_spec(spec, out=tmp_path / spec)):
            if "#" in job.command:  # a sketch with a comment (the grid: one `fluidbench sample` per prompt), or a
                continue          # job that only the sweep runs (`fluidbench sweep --only`)
            words = shlex.split(job.command)[1:]
            command, path = root, []
            while hasattr(command, "commands"):  # a group: the next word names its command
                path.append(words.pop(0))
                command = command.commands[path[-1]]
            context = command.make_context(" ".join(path), list(words))
            parsed.add(" ".join(path))
            if isinstance(job, TrainRun):
                cfg = RunConfig.from_overrides(context.params["overrides"])
                assert cfg.train.steps == job.cfg.train.steps and cfg.dist.strategy == job.cfg.dist.strategy
    assert {"data shapes", "tokenizer train", "eval train-features", "train", "eval fid", "eval geneval",
            "eval clipscore", "report"} <= parsed


def test_extra_seeds_of_a_rung_are_runs_of_their_own(tmp_path):
    """`seeds: n` in extra_runs trains seeds 0..n-1 of a rung: seed 0 is the grid's run, the others get their own
    folders, train.seed + k, and the evaluations of every run."""
    from harness.sweep import load_spec, plan

    path = tmp_path / "s.yaml"
    path.write_text(EMBEDDED_WITH_SEEDS)
    spec = load_spec(path, out=tmp_path / "out")
    jobs = {j.name: j for j in plan(spec)}
    assert spec.extra_seeds("kl-random", "cpu-s") == [1, 2] and spec.extra_seeds("vq-random", "cpu-s") == []
    for k in (1, 2):
        train = jobs[f"train/kl-random-cpu-s-seed{k}"]
        assert train.values["train.seed"] == 7 + k and train.values["out"].endswith(f"kl-random-cpu-s-seed{k}")
        assert f"eval/geneval/kl-random-cpu-s-seed{k}" in jobs and f"eval/fid/kl-random-cpu-s-seed{k}" in jobs
        assert f"eval/geneval/kl-random-cpu-s-seed{k}" in jobs["report"].deps
    assert jobs["train/kl-random-cpu-s"].values["train.seed"] == 7
    path.write_text(EMBEDDED_WITH_SEEDS.replace("seeds: 3", "seeds: 0"))
    with pytest.raises(FluidbenchError, match=r"extra_runs\[0\].seeds"):
        load_spec(path, out=tmp_path / "out")


EMBEDDED_WITH_SEEDS = """
name: seeds
data: {kind: shapes, shapes: {seed: 0, train: 64, val: 16, size: 32}}
tokenizers: {vq: {train: {steps: 3}}, kl: {train: {steps: 3}}}
text: {encoder: minilm, max_length: 16}
ladder: cpu
variants: [vq-random, kl-random]
sizes: [cpu-xs, cpu-s]
extra_runs: [{variant: kl-random, size: cpu-s, seeds: 3}]
run: {train: {steps: 4, batch_size: 8, seed: 7}}
eval:
  fid: {n: 16, extractor: shapes}
  geneval: {per_prompt: 1, detector: shapes-oracle}
"""
