"""Bad input through the real command line: each case runs `python -m harness ...` as a subprocess and asserts
the exit status, a single `error:` line naming the field or file, no traceback, and that every file the user
had is still there with the same bytes (set aside under another name at most). Crafted weights files carry a
pickle payload that creates a marker file: it must never appear."""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import cli_args, shared_inputs, tiny_values

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers ----------------------------------------------------------------------------------------------

def run_cli(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FLUIDBENCH_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def contents(root: Path, skip: str = "\0") -> Counter:
    """The bytes of every file under root (by digest): what the user has, whatever the names."""
    return Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
                   if p.is_file() and not p.name.endswith(skip))


def kept(before: Counter, after: Counter) -> bool:
    """Every file of `before` is still there (possibly renamed, e.g. set aside as *.corrupt)."""
    return all(after[k] >= n for k, n in before.items())


def assert_refused(result: subprocess.CompletedProcess, *names: str) -> str:
    """Exit 2, exactly one `error:` line, no traceback, and every name in that line."""
    # a progress bar left open ends without a newline: the error may follow it on the same line
    errors = re.findall(r"error: [^\r\n]*", result.stderr)
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr[-1500:]}"
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert len(errors) == 1, result.stderr[-1500:]
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    return errors[0]


class Payload:
    """Unpickled, it opens (creates) the marker file: the crafted weights' 'code execution'."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_weights(path: Path, marker: Path, torchscript_entry: bool = False) -> Path:
    torch.save({"conv.weight": torch.zeros(2), "payload": Payload(marker)}, path)
    if torchscript_entry:  # what made eval/colors.py take the weights_only=False path
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr(f"{path.stem}/constants.pkl", b"")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return shared_inputs(tmp_path_factory)


@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory) -> tuple[Path, dict]:
    """A finished 4-step run (checkpoints at steps 2 and 4) and its settings."""
    from harness.config import RunConfig
    from harness.train import train

    torch.set_num_threads(1)
    values = tiny_values(inputs, tmp_path_factory.mktemp("finished") / "run",
                         **{"train.steps": 4, "train.val_every": 0, "train.ckpt_every": 2, "train.keep_last": 2})
    train(RunConfig.from_overrides(values))
    return Path(values["out"]), values


def copy_run(finished_run, tmp_path: Path) -> tuple[Path, dict]:
    src, values = finished_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    return run, {**values, "out": str(run)}


# ---- (a) no weights file runs code -----------------------------------------------------------------------

def test_crafted_weights_are_live(tmp_path):
    """The crafted file is a real attack: an unrestricted torch.load runs its payload (so the cases below
    that see no marker mean something)."""
    marker = tmp_path / "pwned"
    torch.load(crafted_weights(tmp_path / "w.pth", marker), weights_only=False)
    assert marker.exists()


def test_inception_weights_are_not_unpickled(inputs, tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_weights(tmp_path / "inception.pth", marker)
    result = run_cli(["eval", "fid-ref", "--data", "shapes", "--path", inputs["data"], "--extractor", "inception",
                      "--inception-weights", evil, "--cache", tmp_path / "stats"])
    assert_refused(result, str(evil), "not a torch-fidelity InceptionV3 state dict")
    assert not marker.exists()


def test_tokenizer_checkpoint_is_not_unpickled(inputs, tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_weights(tmp_path / "kl16.ckpt", marker)
    result = run_cli(["train", "--out", tmp_path / "run", "--data", inputs["data"], "--tokenizer", evil])
    assert_refused(result, "tokenizer.path", str(evil))
    assert not marker.exists() and not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("torchscript_entry", [True, False])
def test_clip_weights_are_not_unpickled(tmp_path, torchscript_entry):
    from eval.colors import load_clip_colors
    from harness.errors import FluidbenchError

    marker = tmp_path / "pwned"
    evil = crafted_weights(tmp_path / "ViT-L-14.pt", marker, torchscript_entry)
    match = "TorchScript archive" if torchscript_entry else "could not load CLIP weights"
    with pytest.raises(FluidbenchError, match=match):
        load_clip_colors(evil)
    assert not marker.exists()


def test_mmdet_config_is_never_taken_from_beside_the_checkpoint(tmp_path):
    """mmcv executes a config file as Python: only mmdet's installed copy is used, not one dropped beside
    the downloaded checkpoint."""
    from eval.detectors import MMDET_CONFIG, mmdet_config
    from harness.errors import FluidbenchError

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / MMDET_CONFIG).write_text("open('pwned', 'w')\n")
    package = tmp_path / "site" / "mmdet"
    package.mkdir(parents=True)
    with pytest.raises(FluidbenchError, match="not found in mmdet's configs"):
        mmdet_config(package)
    installed = package / ".mim" / "configs" / "mask2former" / MMDET_CONFIG
    installed.parent.mkdir(parents=True)
    installed.write_text("# mmdet's own\n")
    assert mmdet_config(package) == installed


# ---- (b) nothing lost ------------------------------------------------------------------------------------

@pytest.mark.parametrize("existing", ["folder", "file"])
def test_tokenizer_train_never_overwrites_out(inputs, tmp_path, existing):
    out = tmp_path / "tok"
    if existing == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    before = contents(tmp_path)
    result = run_cli(["tokenizer", "train", "--kind", "vq", "--data", inputs["data"], "--out", out, "--steps", "1"])
    assert_refused(result, f"--out {out}")
    assert contents(tmp_path) == before and not list(tmp_path.glob(".tok*"))


@pytest.mark.parametrize("option, value", [("--steps", "-3"), ("--batch-size", "0")])
def test_tokenizer_train_option_ranges(inputs, tmp_path, option, value):
    result = run_cli(["tokenizer", "train", "--kind", "kl", "--data", inputs["data"], "--out", tmp_path / "tok",
                      option, value])
    assert_refused(result, option)
    assert not (tmp_path / "tok").exists()


def test_a_locked_run_folder_names_its_holder(finished_run, tmp_path):
    run, values = copy_run(finished_run, tmp_path)
    with open(run / ".lock", "a+") as f:  # a trainer holding the run (the same lock train() takes)
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 4242 on node7\n")
        f.flush()
        before = contents(run)
        result = run_cli(["train", *cli_args(values)])
        assert contents(run) == before
    assert_refused(result, str(run), "pid 4242 on node7")


@pytest.mark.parametrize("damage", ["truncate-all", "no-digest"])
def test_no_readable_checkpoint_stops_instead_of_starting_over(finished_run, tmp_path, damage):
    run, values = copy_run(finished_run, tmp_path)
    for ckpt in sorted((run / "checkpoints").glob("step_*.pt")):
        if damage == "truncate-all":
            ckpt.write_bytes(ckpt.read_bytes()[:1000])
        else:  # digest gone and bytes flipped: torch.load alone would load the wrong weights
            ckpt.with_name(ckpt.name + ".sha256").unlink()
            data = bytearray(ckpt.read_bytes())
            data[len(data) // 2] ^= 0xFF
            ckpt.write_bytes(bytes(data))
    before = contents(run, skip=".sha256")  # the digest of a checkpoint set aside goes with it
    result = run_cli(["train", *cli_args(values)])
    assert_refused(result, str(run), "no readable checkpoint")
    assert kept(before, contents(run)) and (run / "summary.json").exists()  # results kept, checkpoints set aside
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]


@pytest.mark.parametrize("change, field", [({"optim.lr": 3e-3}, "optim.lr"), ({"model.size": "cpu-s"}, "model.size")])
def test_resume_compares_the_checkpoints_config(finished_run, tmp_path, change, field):
    """config.json lost: the config stored in the checkpoint still guards the run (another size was a
    state-dict traceback, another lr went on silently)."""
    run, values = copy_run(finished_run, tmp_path)
    (run / "config.json").unlink()
    (run / "summary.json").unlink()  # an unfinished run, so the resume would train
    before = contents(run)
    result = run_cli(["train", *cli_args({**values, **change, "train.steps": 6})])
    assert_refused(result, field, "step_00000004.pt")
    assert contents(run) == before and not (run / "config.json").exists()


def test_resume_by_another_spelling_of_the_path(finished_run, tmp_path):
    run, values = copy_run(finished_run, tmp_path)
    summary = (run / "summary.json").read_text()
    result = run_cli(["train", *cli_args({**values, "out": "./run"})], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-1500:]
    assert (run / "summary.json").read_text() == summary


def test_a_dead_attempt_before_its_first_checkpoint_is_cleaned(inputs, tmp_path):
    """Killed before any checkpoint: its rows and its half-written temporaries are not the new run's."""
    values = tiny_values(inputs, tmp_path / "run", **{"train.steps": 2, "train.val_every": 0})
    run = Path(values["out"])
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "dead": True}) + "\n" for s in (0, 2, 4)))
    stale = run / "checkpoints" / ".step_00000002.pt.a1b2c3.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = run_cli(["train", *cli_args(values)])
    assert result.returncode == 0, result.stderr[-1500:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] and not any("dead" in r for r in rows)
    assert not stale.exists()


# ---- (c) every input validated where it enters -----------------------------------------------------------

def test_bad_data_then_the_corrected_command_runs(inputs, tmp_path):
    """A run that failed on bad input has written nothing that refuses the corrected command."""
    bad = tmp_path / "data"
    shutil.copytree(inputs["data"], bad, ignore=shutil.ignore_patterns("cache"))
    np.save(bad / "train" / "images.npy", np.load(bad / "train" / "images.npy").astype(np.float64))
    values = tiny_values({**inputs, "data": bad}, tmp_path / "run", **{"train.steps": 2, "train.val_every": 0})
    result = run_cli(["train", *cli_args(values)])
    assert_refused(result, "train/images.npy", "float64")
    assert not (tmp_path / "run" / "config.json").exists()
    result = run_cli(["train", *cli_args({**values, "data.path": str(inputs["data"])})])
    assert result.returncode == 0, result.stderr[-1500:]


def test_images_of_another_size_than_the_tokenizer(inputs, tmp_path):
    from harness.data.shapes import write_shapes

    write_shapes(tmp_path / "data64", seed=0, n_train=4, n_val=4, size=64, prompts_per_task=1, progress=False)
    values = tiny_values({**inputs, "data": tmp_path / "data64"}, tmp_path / "run", **{"train.steps": 2})
    result = run_cli(["train", *cli_args(values)])
    assert_refused(result, "64x64", "tokenizer", "data.path")


def test_nan_learning_rate(inputs, tmp_path):
    """nan passes every range comparison: it failed later, as a non-finite loss."""
    values = tiny_values(inputs, tmp_path / "run")
    result = run_cli(["train", *cli_args(values), "optim.lr=nan"])
    assert_refused(result, "optim.lr=nan")
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file(inputs, tmp_path):
    out = tmp_path / "run"
    out.write_text("mine")
    result = run_cli(["train", *cli_args(tiny_values(inputs, out))])
    assert_refused(result, str(out))
    assert out.read_text() == "mine"


def _shapes_copy(inputs, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(inputs["data"], data, ignore=shutil.ignore_patterns("cache"))
    return data


@pytest.mark.parametrize("damage, named", [
    ("manifest", "manifest.json"),
    ("caption", "captions.jsonl:1"),
    ("float64", "dtype float64"),
    ("not-square", "images.npy"),
])
def test_shapes_data_checked_where_it_enters(inputs, tmp_path, damage, named):
    data = _shapes_copy(inputs, tmp_path)
    images = data / "train" / "images.npy"
    if damage == "manifest":
        (data / "manifest.json").write_text('{"version": 1,')
    elif damage == "caption":
        lines = (data / "train" / "captions.jsonl").read_text().splitlines()
        lines[0] = json.dumps({"tag": "single_object"})
        (data / "train" / "captions.jsonl").write_text("\n".join(lines) + "\n")
    elif damage == "float64":
        np.save(images, np.load(images).astype(np.float64))
    else:
        np.save(images, np.load(images)[:, :, :16])
    before = contents(data)
    result = run_cli(["data", "check", "--kind", "shapes", "--path", data])
    assert_refused(result, named)
    assert contents(data) == before


def test_tar_shard_cut_at_a_member_boundary(tmp_path):
    from test_loaders import make_shard

    shard = make_shard(tmp_path / "shard.tar", n=6)
    with tarfile.open(shard) as tar:
        cut = tar.getmembers()[8].offset  # the header of sample 4: the first 4 samples stay whole
    shard.write_bytes(shard.read_bytes()[:cut])
    result = run_cli(["data", "check", "--kind", "wds", "--path", shard])
    assert_refused(result, str(shard), "broken tar shard")


def test_tar_shards_hold_fewer_samples_than_asked(tmp_path):
    from test_loaders import make_shard

    shard = make_shard(tmp_path / "shard.tar", n=3)
    result = run_cli(["data", "check", "--kind", "wds", "--path", shard, "--n", "5"])
    assert_refused(result, "3 samples", "5")


def _damaged_tokenizer(inputs, tmp_path: Path, damage: str) -> Path:
    tok = tmp_path / damage
    shutil.copytree(inputs["vq"], tok)
    weights = tok / "model" / "diffusion_pytorch_model.safetensors"
    if damage == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[:500])
    elif damage == "weights-missing":
        weights.unlink()
    elif damage == "model-config":
        (tok / "model" / "config.json").write_text("{not json")
    else:
        meta = json.loads((tok / "tokenizer.json").read_text())
        del meta["kind"]
        (tok / "tokenizer.json").write_text(json.dumps(meta))
    return tok


def test_damaged_tokenizer_folder(inputs, tmp_path):
    tok = _damaged_tokenizer(inputs, tmp_path, "weights-truncated")
    before = contents(tok)
    result = run_cli(["tokenizer", "eval", "--tokenizer", tok, "--data", inputs["data"]])
    assert_refused(result, "--tokenizer", str(tok), "cannot be read")
    assert contents(tok) == before


@pytest.mark.parametrize("damage, named", [("weights-missing", "cannot be read"), ("model-config", "cannot be read"),
                                           ("no-kind", "tokenizer.json: missing kind")])
def test_damaged_tokenizer_folder_other_ways(inputs, tmp_path, damage, named):
    """The same wrapper (the case above runs it through the command line), in this process: each was a traceback."""
    from variants.tokenizers import load_tokenizer

    tok = _damaged_tokenizer(inputs, tmp_path, damage)
    with pytest.raises(ValueError, match=re.escape(named)) as e:
        load_tokenizer(tok)
    assert str(tok) in str(e.value) and "\n" not in str(e.value)


def _geneval_folder(root: Path, tag: str = "single_object") -> Path:
    from eval.geneval_folder import write_prompt_folder

    meta = {"tag": tag, "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for index in range(2):
        write_prompt_folder(root, index, meta, [image] * 3)
    return root


@pytest.mark.parametrize("damage, named", [
    ("missing-sample", "00001/samples/1.png"),
    ("missing-last-sample", "00001/samples/2.png: missing (expected 3 images per prompt, found 2)"),
    ("missing-metadata", "00001/metadata.jsonl"),
    ("unknown-tag", "'shapes'"),
    ("not-png", "00000/samples/0.png"),
])
def test_geneval_folder_complete_and_known(tmp_path, damage, named):
    folder = _geneval_folder(tmp_path / "images", tag="shapes" if damage == "unknown-tag" else "single_object")
    if damage == "missing-sample":
        (folder / "00001" / "samples" / "1.png").unlink()
    elif damage == "missing-last-sample":  # no gap to see: caught by the count the user states
        (folder / "00001" / "samples" / "2.png").unlink()
    elif damage == "missing-metadata":
        (folder / "00001" / "metadata.jsonl").unlink()
    elif damage == "not-png":
        (folder / "00000" / "samples" / "0.png").write_bytes(b"GIF89a not really")
    before = contents(folder)
    result = run_cli(["eval", "geneval-score", "--images", folder, "--detector", "shapes-oracle", "--device", "cpu",
                      "--n", "3"])
    assert_refused(result, named)
    assert contents(folder) == before and not (folder / "summary.json").exists()


@pytest.mark.parametrize("args, names", [
    (["eval", "fid", "--run", "R", "--n", "1"], ["fluidbench eval fid", "--n", "2"]),   # out of the option's range
    (["eval", "fid", "--run", "R", "--bogus"], ["fluidbench eval fid", "--bogus"]),     # no such option
    (["train", "--variant", "vq-raster"], ["fluidbench train", "--out"]),             # a required option missing
    (["nosuch"], ["nosuch"]),                                                          # no such command
])
def test_bad_usage_is_one_line_naming_the_option(tmp_path, args, names):
    """Errors that click finds before a command runs read like every other bad input: exit 2, one line."""
    result = run_cli(args, cwd=tmp_path)
    assert_refused(result, *names)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
