"""Checkpoint files: atomic, last k kept, weights_only loading, corruption detected with fallback."""
from __future__ import annotations

import pytest
import torch

from harness.checkpoint import (list_checkpoints, load_checkpoint, load_latest, rng_state, save_checkpoint,
                                set_rng_state)


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return dict(model={"w": torch.full((4,), float(step))}, ema={"w": torch.zeros(4)},
                optimizer={"state": {}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["w"]}]},
                schedule={"step": step}, step=step, data={"epoch": 0, "offset": step}, config={"out": "x"},
                rng=rng_state({"loss": g}))


def test_keeps_last_k_and_loads_with_weights_only(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, _state(step), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003.pt", "step_00000004.pt"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp"))  # no temporary files left behind
    state, path = load_latest(tmp_path)
    assert path.name == "step_00000004.pt" and state["step"] == 4
    assert torch.equal(state["model"]["w"], torch.full((4,), 4.0))
    assert state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    for step in (1, 2):
        save_checkpoint(tmp_path, _state(step), keep_last=3)
    newest = list_checkpoints(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # torch.load alone would not notice this one
    else:
        data = bytearray(b"not a checkpoint")
    newest.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="step_00000002.pt"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="falling back"):
        state, path = load_latest(tmp_path)
    assert state["step"] == 1 and path.name == "step_00000001.pt"
    assert (newest.parent / "step_00000002.pt.corrupt").exists()  # reported and set aside


def test_no_checkpoint_is_none(tmp_path):
    assert load_latest(tmp_path) is None


def test_rng_states_round_trip():
    g = torch.Generator().manual_seed(5)
    state = rng_state({"loss": g})
    expected = (torch.rand(3), torch.rand(3, generator=g))
    set_rng_state(state, {"loss": g})
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.rand(3, generator=g), expected[1])


def test_other_ranks_skip_the_digest_the_main_rank_checked(tmp_path):
    """verify=False (ranks other than the main one) reads the file without hashing it again."""
    path = save_checkpoint(tmp_path, _state(1), keep_last=1)
    weights = load_checkpoint(path)["model"]
    digest = path.with_name(path.name + ".sha256")
    digest.write_text("0" * 64 + "\n")  # a digest that no file matches
    with pytest.raises(ValueError, match="sha256 does not match"):
        load_checkpoint(path)
    unverified = load_checkpoint(path, verify=False)["model"]
    assert all(torch.equal(unverified[k], weights[k]) for k in weights)


def test_a_checkpoint_without_its_digest_is_not_trusted(tmp_path):
    """Flipped bytes go unnoticed by torch.load: with the digest deleted too, the file must not be loaded."""
    for step in (1, 2):
        save_checkpoint(tmp_path, _state(step), keep_last=3)
    newest = list_checkpoints(tmp_path)[-1]
    newest.with_name(newest.name + ".sha256").unlink()
    with pytest.raises(ValueError, match=r"step_00000002\.pt: its digest step_00000002\.pt\.sha256 is missing"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="falling back"):
        state, path = load_latest(tmp_path)
    assert state["step"] == 1


def test_temporaries_of_killed_writes_are_removed(tmp_path):
    from harness.checkpoint import remove_temporaries

    path = save_checkpoint(tmp_path, _state(1), keep_last=1)
    stale = [path.parent / ".step_00000002.pt.k2j3h4.tmp", tmp_path / ".config.json.x8y9.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    remove_temporaries(tmp_path)
    assert not any(p.exists() for p in stale) and path.exists()
