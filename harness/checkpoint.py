"""Checkpoints: RUN/checkpoints/step_XXXXXXXX.pt, written atomically, the last k kept, verified on load.

A checkpoint is a plain dict of tensors and Python values (model, ema, optimizer, schedule, step, data
position, RNG states, config), so it loads with `torch.load(weights_only=True)`. Beside each file a
`.sha256` records its digest: torch.load notices a truncated file but not flipped bytes, the digest does, so
a checkpoint without one is not trusted. A checkpoint that fails either check is reported, renamed to
`*.corrupt`, and the previous one is used.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from harness.atomic import atomic_path, write_text
from harness.hashing import sha256_file

CHECKPOINT_KEYS = ("model", "ema", "optimizer", "schedule", "step", "data", "rng", "config")
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` as step_<step>.pt (temporary file, fsync, rename), then delete all but the last k."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {', '.join(missing)}")
    path = checkpoint_dir(run_dir) / f"step_{int(state['step']):08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        # the digest goes first: a crash between the two renames leaves a digest without a file, never a file
        # without its digest
        write_text(_digest_path(path), sha256_file(tmp) + "\n")
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
        _digest_path(old).unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    verify: bool = True) -> dict[str, Any]:
    """Load and verify one checkpoint; ValueError (naming the file and the problem) if it is corrupt.

    The file is memory-mapped, not read into each process: the ranks of a node share one copy in the page
    cache (a 10.5B checkpoint with its optimizer state is ~170 GB; eight private copies would not fit).
    `verify=False` skips the digest (ranks other than the main one, which has verified the same file).
    """
    path = Path(path)
    digest = _digest_path(path)
    if verify:
        if not digest.is_file():
            raise ValueError(f"checkpoint {path}: its digest {digest.name} is missing (written before every "
                             "checkpoint), so its bytes cannot be verified")
        expected = digest.read_text().strip()
        if sha256_file(path) != expected:
            raise ValueError(f"checkpoint {path}: sha256 does not match {digest.name} (corrupted or truncated)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, pickle errors or EOFError depending on the damage
        raise ValueError(f"checkpoint {path}: cannot be read ({' '.join(str(e).split())[:200]})") from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"checkpoint {path}: missing {', '.join(missing)}")
    return state


def load_latest(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                quarantine: bool = True, verify: bool = True) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies, or None if there is none; corrupt ones are reported and skipped.

    With `quarantine`, a corrupt file is renamed to `*.corrupt` so that it is neither reused nor counted
    among the last k (evaluation passes False: it only reads the run).
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path, map_location, verify), path
        except ValueError as e:
            warnings.warn(f"{e}; falling back to the previous checkpoint", stacklevel=2)
            if quarantine:
                path.rename(path.with_name(path.name + ".corrupt"))
                _digest_path(path).unlink(missing_ok=True)
    return None


def remove_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete the temporary files of atomic writes that a killed process left in RUN and RUN/checkpoints
    (`.NAME.XXXX.tmp`, harness.atomic's naming). Only for the process that holds the run's lock."""
    for folder in (Path(run_dir), checkpoint_dir(run_dir)):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG state as uint8 tensors: torch's CPU and CUDA defaults and the named generators."""
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state(),
                             "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what rng_state() captured; generators absent from `state` keep their current state."""
    torch.set_rng_state(state["torch_cpu"])
    for name, g in generators.items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


