"""`train(cfg) -> summary`: one variant at one size, from a laptop CPU to a multi-node torchrun/srun job.

The loop reads top to bottom: settings checked before any work, the run folder (resumed if it has a
checkpoint), tokenizer, text encoder and variant, cached inputs, parallelism, optimizer and EMA, then the
steps. Nothing inside a step waits on the device: losses accumulate on the device and are read at log
intervals. Exact resume: the data order is a function of (seed, epoch), its position is checkpointed, and
every RNG state (torch's, the loss generator's, the data generator's, per process) goes in the checkpoint.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from harness import distributed as D
from harness.atomic import append_jsonl, read_jsonl, write_json, write_text
from harness.checkpoint import (list_checkpoints, load_latest, remove_temporaries, rng_state, save_checkpoint,
                                set_rng_state)
from harness.config import RunConfig, diff, flatten
from harness.devices import autocast_dtype as choose_autocast, to_device
from harness.errors import FluidbenchError

# Settings a resumed run may change: its length, its logging, and how it is spread over devices.
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.val_every", "train.ckpt_every", "train.keep_last",
                     "dist.", "data.cache_dir")
# `fluidbench train`'s exit status after a SIGTERM/SIGUSR1 stop with its checkpoint saved: sysexits.h's
# EX_TEMPFAIL ("a temporary failure; the user is invited to retry"), so `train && eval` does not evaluate an
# unfinished run and a batch script can requeue on exactly this status (docs/cluster.md).
EXIT_INTERRUPTED = 75


def train(cfg: RunConfig) -> dict[str, Any]:
    """Train (or resume) the run in cfg.out; returns the summary (also written to RUN/summary.json).

    Interrupted by SIGTERM/SIGUSR1, it saves a checkpoint and returns {"status": "interrupted", ...}
    without a summary.json; the same call resumes it (the CLI then exits with EXIT_INTERRUPTED).
    """
    cfg.validate()
    info = D.init_distributed()
    try:
        with run_lock(Path(cfg.out)) if info.is_main else nullcontext():
            return _train(cfg, info)
    finally:
        D.shutdown()


@contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """An exclusive lock on RUN held while training in it: a second trainer on the same folder (by any
    spelling of its path) stops with one line naming the holder, instead of both appending to its files."""
    import fcntl
    import os
    import socket

    if run.exists() and not run.is_dir():
        raise FluidbenchError(f"config out={run}: a file, not a run folder")
    run.mkdir(parents=True, exist_ok=True)
    path = run / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = " ".join(f.read().split()) or "another process"
            raise FluidbenchError(f"{run} is being trained by {holder} (lock {path}): wait for it, or stop it "
                                  "first") from None
        except OSError:
            pass  # a file system without flock: run unlocked
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def _train(cfg: RunConfig, info: D.DistInfo) -> dict[str, Any]:
    from harness.runs import (build_model, check_names, check_token_kind, load_text_encoder, load_tokenizer,
                              open_split, size_name)

    # ---- settings that can fail, before any work ----
    batch_per_rank = D.per_rank_batch(cfg.train.batch_size, info)
    check_names(cfg)
    run = Path(cfg.out)
    if info.is_main:
        remove_temporaries(run)  # of writes a killed trainer left (we hold the run's lock)
    resuming = _has_progress(run)
    if resuming:  # a run with nothing saved yet takes the new settings: a corrected command after a failure
        _check_resume_config(run / "config.json", cfg)
    found = load_latest(run) if info.is_main else None  # the main process sets corrupt files aside first
    if info.is_main and found is None and resuming:
        raise FluidbenchError(f"{run}: has results but no readable checkpoint (corrupt ones set aside as "
                              f"{run / 'checkpoints'}/*.corrupt); not starting over them: use a new --out")
    D.barrier()
    if not info.is_main:  # the newest file is now the one the main process verified: no second digest
        found = load_latest(run, quarantine=False, verify=False)
    if found is not None:
        _check_resume_config(found[1], cfg, found[0]["config"])  # also when config.json was lost
        if found[0]["step"] > cfg.train.steps:
            raise FluidbenchError(f"{run} is already at step {found[0]['step']}, past train.steps={cfg.train.steps}")
        if found[0]["step"] == cfg.train.steps and (run / "summary.json").exists():
            return json.loads((run / "summary.json").read_text())  # finished: nothing to do
    tokenizer = load_tokenizer(cfg, info.device)
    check_token_kind(cfg, tokenizer)
    text_encoder = load_text_encoder(cfg, info.device)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every process
    variant = build_model(cfg, tokenizer, text_encoder.dim).to(info.device)

    # ---- cached inputs (built once, on the main process) ----
    if info.is_main:
        train_data = open_split(cfg, "train", tokenizer, text_encoder)
        val_data = open_split(cfg, "val", tokenizer, text_encoder)
    D.barrier()
    if not info.is_main:
        train_data = open_split(cfg, "train", tokenizer, text_encoder)
        val_data = open_split(cfg, "val", tokenizer, text_encoder)
    sampler = EpochSampler(len(train_data), cfg.train.batch_size, cfg.train.seed)

    # ---- parallelism, then the optimizer over the (possibly sharded) parameters, EMA ----
    counts = variant.param_counts()
    flops_per_image = float(variant.train_flops_per_image())
    model = D.parallelize(variant, cfg.dist, info)
    optimizer = make_optimizer(cfg, variant)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ema = EMA(params)
    # the loss draws (orders, masks, timesteps, noise) on the device, so no step waits on a host copy; the KL
    # token samples are drawn where the cache lives, on the host
    loss_gen = torch.Generator(info.device).manual_seed(cfg.train.seed * 1_000_003 + info.rank + 1)
    data_gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + info.rank + 7_919)
    generators = {"loss": loss_gen, "data": data_gen}
    autocast_dtype = choose_autocast(cfg.dist.dtype, info.device)

    # ---- resume ----
    step, wall_before, last_ckpt = 0, 0.0, None
    if found is not None:  # found, and checked against the settings, before any work
        (state, last_ckpt), found = found, None  # the only reference to the state: freed below
        D.load_model_state_dict(model, state["ema"])
        ema.copy_from(params)
        D.load_model_state_dict(model, state["model"])
        D.load_optimizer_state_dict(model, optimizer, state["optimizer"])
        step, wall_before = state["step"], state["schedule"]["wall_s"]
        sampler.load_state_dict(state["data"])
        ranks = state["rng"]["ranks"]
        if len(ranks) == info.world_size:
            set_rng_state(ranks[info.rank], generators)
        elif info.is_main:
            print(f"resuming with {info.world_size} processes, saved with {len(ranks)}: the loss generators "
                  "restart from their seeds (the data order is still exact)", file=sys.stderr)
        if info.is_main:
            print(f"resuming {run} from {last_ckpt.name}", file=sys.stderr)
        del state
    if info.is_main and (run / "metrics.jsonl").exists():
        # rows logged after the resumed step (step 0 when nothing was saved) belong to a lost future: drop them
        keep_to = step if last_ckpt is not None else -1
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("step", 0) <= keep_to]
        write_text(run / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    if info.is_main:
        # the run's first file once every input has been read and the settings matched any checkpoint's:
        # a run that failed on bad input leaves nothing to refuse a corrected command with
        write_json(run / "config.json", cfg.to_dict())

    def validate() -> float:
        from eval.loss import validation_loss
        model.eval()
        with ema.swapped_in(params):
            loss = validation_loss(model, val_data, batch_size=cfg.train.val_batch_size, seed=cfg.train.val_seed,
                                   size=cfg.train.val_size, device=info.device, autocast_dtype=autocast_dtype)
        model.train()
        return loss

    def save(status: str) -> Path | None:
        # the loss is checked before a step's update and the weights saved after it: check what is saved
        bad = torch.stack([~torch.isfinite(_local(t)).all() for t in (*params, *ema.shadow)]).any().float()
        if D.all_reduce(bad.reshape(1), op="max").item():
            where = f"; last good checkpoint {last_ckpt or 'none'} kept" if info.is_main else ""
            raise FluidbenchError(f"weights are not finite at step {step} (lr {learning_rate(cfg, step):.3g}): "
                                  f"not saved, stopped{where}")
        with ema.swapped_in(params):
            ema_state = D.model_state_dict(model)
        state = dict(model=D.model_state_dict(model), ema=ema_state,
                     optimizer=D.optimizer_state_dict(model, optimizer),
                     schedule={"step": step, "lr": learning_rate(cfg, step), "wall_s": wall_s()},
                     step=step, data=sampler.state_dict(), config=cfg.to_dict(), status=status,
                     rng={"ranks": D.all_gather_object(rng_state(generators))})
        path = save_checkpoint(run, state, cfg.train.keep_last) if info.is_main else None
        D.barrier()
        return path

    def log(row: dict[str, Any]) -> None:
        if info.is_main:
            append_jsonl(run / "metrics.jsonl", row)

    # ---- the loop ----
    steps = cfg.train.steps
    start_step, t_start = step, time.perf_counter()
    wall_s = lambda: wall_before + time.perf_counter() - t_start  # noqa: E731
    stop = _StopSignal(info.device)
    pbar = _progress(steps, step, info.is_main)
    loss_sum, loss_count = torch.zeros((), device=info.device), 0
    last_loss, last_val = float("nan"), float("nan")
    train_s = 0.0  # time in training steps only (not validation or checkpoints): for images_per_s
    if step == 0 and cfg.train.val_every:
        last_val = validate()
        log({"step": 0, "val_loss": last_val, "wall_s": wall_s()})
    model.train()
    t_log, step_log = time.perf_counter(), step
    with stop.installed():
        while step < steps:
            indices = sampler.next_batch()[info.rank * batch_per_rank:(info.rank + 1) * batch_per_rank]
            batch = to_device(train_data.batch(indices, data_gen), info.device)
            loss, lr = train_step(cfg, step, model, optimizer, ema, params, batch, loss_gen, autocast_dtype)
            loss_sum += loss
            loss_count += 1
            step += 1
            pbar.update(1)

            last = step == steps
            do_val = last or (cfg.train.val_every and step % cfg.train.val_every == 0)
            do_ckpt = last or step % cfg.train.ckpt_every == 0
            if last or do_val or do_ckpt or step % cfg.train.log_every == 0:
                # the one host sync: mean loss over processes and steps since the last log
                total = D.all_reduce(torch.stack([loss_sum, loss_sum.new_tensor(loss_count)]))
                last_loss = (total[0] / total[1]).item()
                if not math.isfinite(last_loss):
                    where = f"; last good checkpoint {last_ckpt or 'none'} kept" if info.is_main else ""
                    raise FluidbenchError(f"train loss is {last_loss} by step {step} (lr {lr:.3g}): stopped{where}")
                interval_s = time.perf_counter() - t_log
                train_s += interval_s
                images_per_s = (step - step_log) * cfg.train.batch_size / interval_s
                row = {"step": step, "train_loss": last_loss, "lr": lr, "images_per_s": images_per_s,
                       "epoch": sampler.epoch, "wall_s": wall_s()}
                if do_val:
                    row["val_loss"] = last_val = validate()
                log(row)
                pbar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
                loss_sum.zero_()
                loss_count = 0
            if do_ckpt:
                last_ckpt = save("complete" if last else "running")
            if loss_count == 0:  # just logged: the next interval starts now
                t_log, step_log = time.perf_counter(), step
            if not last and stop.requested(every=cfg.train.log_every, step=step):
                last_ckpt = save("interrupted")
                pbar.close()
                if info.is_main:
                    print(f"signal {stop.signum}: saved {last_ckpt} at step {step}; run the same command to resume",
                          file=sys.stderr)
                return {"status": "interrupted", "steps": step, "checkpoint": str(last_ckpt)}
    pbar.close()
    if step == start_step:  # finished before its summary was written: take the numbers again
        last_val = validate()
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r]
        last_loss = rows[-1]["train_loss"] if rows else float("nan")

    # ---- summary ----
    images = step * cfg.train.batch_size
    summary = dict(
        status="complete", variant=cfg.model.variant, size=size_name(cfg), ladder=cfg.model.ladder,
        steps=step, images_seen=images, tokens_seen=images * tokenizer.seq_len,
        train_flops=flops_per_image * images, train_flops_per_image=flops_per_image,
        train_loss=last_loss, val_loss=last_val, params=counts["total"],
        param_counts=counts, wall_s=wall_s(),
        images_per_s=(step - start_step) * cfg.train.batch_size / train_s if step > start_step else None,
        world_size=info.world_size, strategy=cfg.dist.strategy, device=info.device.type, lr=cfg.lr(),
        checkpoint=str(last_ckpt) if last_ckpt else None)
    if info.is_main:
        write_json(run / "summary.json", summary)
    return summary


def train_step(cfg: RunConfig, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, ema: "EMA",
               params: list[torch.Tensor], batch: dict[str, torch.Tensor], loss_gen: torch.Generator,
               autocast_dtype: torch.dtype | None, mark: Any = None) -> tuple[torch.Tensor, float]:
    """One optimisation step of the recipe: the step's lr, forward + backward (autocast when autocast_dtype is
    set), gradient clipping, the optimizer, the EMA. Returns the detached float loss (no host sync) and the lr.

    `mark()`, when given, is called as forward begins and as backward ends (make bench times the parts).
    """
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if mark:
        mark()
    device_type = batch["tokens"].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(batch["tokens"], batch["text"], batch["text_mask"], loss_gen)
    loss.backward()
    if mark:
        mark()
    if cfg.optim.grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(params, ema_decay(cfg, step))
    return loss.detach().float(), lr


def make_optimizer(cfg: RunConfig, variant: nn.Module) -> torch.optim.Optimizer:
    """AdamW of the recipe over the variant's parameters, weight decay per group (none on biases, norms,
    embeddings or the diffusion head)."""
    groups = weight_decay_groups(variant, cfg.optim.weight_decay)
    # fused: one kernel for all parameters; the per-parameter loop took ~10% of a CPU-ladder step (make bench)
    return torch.optim.AdamW(groups, lr=cfg.lr(), betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=0.0,
                             fused=True)


def learning_rate(cfg: RunConfig, step: int) -> float:
    """Linear warm-up from 0 over warmup_steps, then constant or cosine to lr * min_lr_ratio."""
    peak, warmup = cfg.lr(), cfg.optim.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.optim.schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, cfg.train.steps - warmup))
        floor = cfg.optim.min_lr_ratio
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return peak


def ema_decay(cfg: RunConfig, step: int) -> float:
    if cfg.optim.ema_warmup:
        return min(cfg.optim.ema_decay, (1 + step) / (10 + step))
    return cfg.optim.ema_decay


def weight_decay_groups(variant: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on the transformer's matrices; none on biases, norms, embeddings (positions,
    mask/start tokens, null text, code embeddings) and the diffusion head (MAR's recipe). The variant says
    which is which (`param_groups`); a model without that helper gets: no decay below 2 dims."""
    if hasattr(variant, "param_groups"):
        return variant.param_groups(weight_decay)
    params = [p for p in variant.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class EpochSampler:
    """Global batches of indices: epoch e is a permutation drawn from Generator(seed + e); the last partial
    batch of an epoch is dropped. The position (epoch, offset) is the whole state: resume is exact."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < batch_size:
            raise FluidbenchError(f"train split has {size} items, fewer than train.batch_size={batch_size}")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def next_batch(self) -> torch.Tensor:
        if self.offset + self.batch_size > self.size:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation()
        batch = self._perm[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:
            raise FluidbenchError(f"train split has {self.size} items but the checkpoint was written with "
                                  f"{state['size']}: data.path changed")
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._perm = self._permutation()


class EMA:
    """Exponential moving average of the trainable weights (kept beside the model, in its sharding)."""

    def __init__(self, params: list[torch.Tensor]):
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], decay: float) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - decay)

    @torch.no_grad()
    def copy_from(self, params: list[torch.Tensor]) -> None:
        for s, p in zip(self.shadow, params):
            s.copy_(p.detach())

    @contextmanager
    def swapped_in(self, params: list[torch.Tensor]) -> Iterator[None]:
        """The EMA weights in the model for the duration (evaluation, saving), the live ones restored after."""
        with torch.no_grad():
            live = [p.detach().clone() for p in params]
            for p, s in zip(params, self.shadow):
                p.detach().copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, x in zip(params, live):
                    p.detach().copy_(x)


class _StopSignal:
    """SIGTERM / SIGUSR1 (Slurm's preemption notice) ask for a checkpoint and a clean exit after the step."""

    def __init__(self, device: torch.device) -> None:
        self.signum: int | None = None
        self.device = device

    @contextmanager
    def installed(self) -> Iterator[None]:
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        names = [s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None]
        previous = {s: signal.signal(s, self._handle) for s in names}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def requested(self, every: int, step: int) -> bool:
        """Every step in one process; with several, agreed at log intervals (a collective) so all stop together."""
        if not D.dist.is_initialized():
            return self.signum is not None
        if step % every:
            return False
        flag = D.all_reduce(torch.tensor([self.signum or 0], device=self.device), op="max")
        self.signum = int(flag.item()) or None
        return self.signum is not None


def _has_progress(run: Path) -> bool:
    """Whether RUN holds results to resume or protect: a checkpoint (good or set aside) or a summary."""
    folder = run / "checkpoints"
    return bool(list_checkpoints(run)) or (run / "summary.json").exists() or \
        (folder.is_dir() and any(folder.glob("step_*.pt.corrupt")))


def _check_resume_config(path: Path, cfg: RunConfig, saved: dict | None = None) -> None:
    """A run is resumed only with the settings it was started with (length and logging may change), as
    recorded in `path` (RUN/config.json) or `saved` (the config stored in a checkpoint). `out` is not compared:
    the folder is the same one, however its path is spelled."""
    if saved is None:
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FluidbenchError(f"{path}: not valid JSON ({e}): restore it, or use a new --out") from None
    try:
        before_cfg = RunConfig.from_dict(saved)
    except FluidbenchError as e:
        raise FluidbenchError(f"{path}: {e}") from None
    changed = [k for k in diff(before_cfg, cfg) if k != "out" and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        k = changed[0]
        before, now = flatten(before_cfg.to_dict()).get(k), flatten(cfg.to_dict()).get(k)
        raise FluidbenchError(f"{path} has {k}={before!r} but this run asks for {now!r}: "
                              "use a new --out, or the same settings to resume")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a (possibly FSDP2-sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0)
