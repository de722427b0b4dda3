"""`make gpu-check`'s CPU smoke: the GPU script's phases (train, FSDP2, KV-cache decode) at the smallest rung."""
from __future__ import annotations

import json
import math

import pytest
import torch

from harness.gpu_check import main


def test_gpu_check_smoke_runs_every_phase(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--smoke", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    train, fsdp, decode = (report["phases"][k] for k in ("train", "fsdp2", "decode"))
    eager = train["eager"]
    assert train["size"] == "cpu-xs" and eager["step_s"] > 0 and eager["mfu"] is None  # no bf16 peak on a CPU
    assert train["flops_per_image"] > 0 and eager["tflops"] > 0 and math.isfinite(eager["loss"])
    # FSDP2 at world size 1 computes what the plain model computes: the same first loss from the same seeds
    assert fsdp["world_1"]["world_size"] == 1
    assert fsdp["world_1"]["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-5)
    assert decode["kv_cache"] is True and decode["seq_len"] == 16 and decode["tokens_per_s"] > 0
    out = capsys.readouterr().out
    assert "train cpu-xs" in out and "fsdp2 world_1" in out and "decode vq-raster" in out


def test_gpu_check_without_a_gpu_asks_for_the_smoke_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "--smoke" in capsys.readouterr().err
