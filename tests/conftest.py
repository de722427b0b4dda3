"""Session fixtures shared by several test files."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny
    models lose more to thread hand-offs than they gain, the machine is shared, and one thread rounds the same
    way on every machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory) -> dict[str, str]:
    """A real single-node Slurm (munged, slurmctld, slurmd) for the whole session, started by
    scripts/local-slurm in a temporary folder; yields the environment that points Slurm's commands at it.
    Skipped where Slurm is not installed or this is not root (slurmd starts jobs as their users), unless
    FLUIDBENCH_REQUIRE_SLURM=1 (CI), where that is an error. Installing is `scripts/local-slurm install`, run
    by .ci/run, not by a test (nothing downloads in a test)."""
    missing = [c for c in ("slurmctld", "slurmd", "sbatch", "munged")
               if not shutil.which(c) and not Path("/usr/sbin", c).exists()]
    reason = (f"Slurm not installed ({', '.join(missing)} missing): run `scripts/local-slurm install` as root"
              if missing else "a local Slurm needs root (slurmd)" if os.geteuid() != 0 else "")
    if reason:
        if os.environ.get("FLUIDBENCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"FLUIDBENCH_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "scripts" / "local-slurm")
    out = subprocess.run([script, "start", str(folder)], capture_output=True, text=True, timeout=180)
    if out.returncode:
        subprocess.run([script, "stop", str(folder)], capture_output=True, timeout=60)
        pytest.fail(f"scripts/local-slurm start failed: {out.stderr.strip()[-2000:]}")
    env = {"SLURM_CONF": str(folder / "slurm.conf"), "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # sbatch, squeue, scontrol in this process and in what it starts
    try:
        yield {**env, "folder": str(folder)}
    finally:
        subprocess.run([script, "stop", str(folder)], capture_output=True, timeout=60)
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
