"""Evaluate a trained run: sample from its EMA weights, score the samples, write RUN/eval/<metric>.json.

Each function records the protocol (data, N, seed, extractor or detector, sampling settings) beside the
number, plus the sampling cost (seconds and forward passes per image). Generated images are kept as PNG in
RUN/eval/<metric>/ so a killed evaluation resumes where it stopped and other tools can read them.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from eval.geneval_folder import iter_prompt_folders, load_prompts, write_prompt_folder
from eval.sampling import CodeStats, LatentStats, SamplingSettings, SamplingStats, generate
from harness.atomic import write_json
from harness.data import profile
from harness.errors import FluidbenchError

OFFICIAL_PROMPTS = Path(__file__).parent / "geneval_data" / "evaluation_metadata.jsonl"


def _open(run_dir: str | Path, device: str | None) -> tuple[Any, str]:
    """The run with its EMA weights, and the device it landed on (for the scorers' models)."""
    from harness.runs import load_run

    run = load_run(run_dir, device=device)
    return run, str(next(run.variant.parameters()).device)


def _record(run: Any, settings: SamplingSettings, stats: SamplingStats) -> dict:
    return {"step": run.step, "checkpoint": str(run.checkpoint),
            "variant": run.config.model.variant, "sampling": settings.resolved(run.variant),
            "sampling_stats": stats.summary()}


def default_prompts(run: Any) -> Path:
    """The run's data set's own prompt file (ShapesT2I has one), else GenEval's official 553 prompts."""
    data = run.config.data
    return profile(data.kind).prompts(data.path) or OFFICIAL_PROMPTS


def eval_geneval(run_dir: str | Path, *, prompts: str | Path | None = None, per_prompt: int = 4,
                 detector: str | None = None, detector_path: str | None = None, clip_path: str | None = None,
                 settings: SamplingSettings | None = None, device: str | None = None,
                 progress: bool = True) -> dict:
    """GenEval of a run: write the official folder layout under RUN/eval/geneval/, score it, save geneval.json."""
    from eval.colors import load_clip_colors
    from eval.detectors import load_detector
    from eval.geneval import needs_colors, score_folder

    run, device = _open(run_dir, device)
    settings = settings or SamplingSettings()
    prompt_file = Path(prompts) if prompts else default_prompts(run)
    metadata = load_prompts(prompt_file)
    detector = detector or profile(run.config.data.kind).detector
    folder = Path(run_dir) / "eval" / "geneval"
    record = _keyed_folder(folder, {"prompts": [m["prompt"] for m in metadata], "per_prompt": per_prompt,
                                    "settings": settings.resolved(run.variant), "step": run.step})
    done = {index for index, _, samples in iter_prompt_folders(folder) if len(samples) >= per_prompt}
    captions = [meta["prompt"] for meta in metadata for _ in range(per_prompt)]
    skip = [index * per_prompt + j for index in done for j in range(per_prompt)]
    # the sampling cost of every image made for this folder, over interrupted evaluations too
    made = record.get("made", {"images": 0, "seconds": 0.0})
    made_latents = LatentStats(**made.get("latents", {}))
    stats, counted = SamplingStats(), 0
    images: list[np.ndarray] = []
    for k, image in generate(run, captions, settings, stats, progress=progress, desc="geneval samples",
                             skip=skip):
        images.append(image)
        if len(images) == per_prompt:  # one prompt complete: write its folder (metadata last marks it done)
            index = k // per_prompt
            write_prompt_folder(folder, index, metadata[index], images)
            images = []
            if stats.images != counted:  # a new batch: record its cost with the images it made
                counted = stats.images
                write_json(folder / "samples.json", {**record, "made": {
                    "images": made["images"] + stats.images, "seconds": made["seconds"] + stats.seconds,
                    "latents": asdict(made_latents.merged(stats.latents))}})
    stats.images, stats.seconds = made["images"] + stats.images, made["seconds"] + stats.seconds
    stats.latents = made_latents.merged(stats.latents)
    det = load_detector(detector, detector_path, device=device)
    colors = load_clip_colors(clip_path, device=device) if not det.colors and needs_colors(metadata) \
        else None
    summary = score_folder(folder, det, colors, progress=progress, per_prompt=per_prompt)
    result = {**summary, "protocol": {"prompts": str(prompt_file), "n_prompts": len(metadata),
                                      "images_per_prompt": per_prompt, "detector": detector},
              **_record(run, settings, stats)}
    write_json(Path(run_dir) / "eval" / "geneval.json", result)
    return result


def _keyed_folder(folder: Path, key: dict) -> dict:
    """Keep `folder`'s samples only if they were made with `key` (what was sampled, the settings, the checkpoint
    step); returns its record, FOLDER/samples.json: {"key": ..., "made": {images, seconds, ...} once written}."""
    import shutil

    key_path = folder / "samples.json"
    record = json.loads(key_path.read_text()) if key_path.is_file() else {}
    if record.get("key") != key:
        shutil.rmtree(folder, ignore_errors=True)  # samples of another checkpoint or settings: never mixed in
        folder.mkdir(parents=True)
        record = {"key": key}
        write_json(key_path, record)
    return record


def _reference_data(run: Any, data_kind: str | None, data_path: str | None, split: str | None,
                    n: int, seed: int) -> tuple[str, str, str, Any]:
    """(kind, path, split, data set) of the real images and captions: N of `split` of the run's own data, or of
    another data set (data_kind + data_path: COCO-2014 for the paper's FID and CLIP score)."""
    from harness.data import open_dataset

    data = run.config.data
    if data_kind or data_path:
        if not (data_kind and data_path and split):
            raise FluidbenchError("reference data: data_kind, data_path and split go together (e.g. coco, "
                                  "/datasets/coco, train2014)")
        kind, path = data_kind, data_path
    else:
        kind, path, split = data.kind, data.path, split or data.val_split
    resolution = None if profile(kind).native_size else run.tokenizer.image_size
    dataset = open_dataset(kind, path, split, image_size=resolution, n=n, seed=seed)
    if len(dataset) < n:
        raise FluidbenchError(f"n={n}: split {split!r} of {path} has only {len(dataset)} images")
    return kind, path, split, dataset


def _captions(dataset: Any, n: int) -> list[str]:
    """The first n captions, from the data set's caption list when it has one (COCO, ShapesT2I): reading
    captions must not decode and resize every image."""
    captions = getattr(dataset, "captions", None)
    return list(captions[:n]) if captions is not None else [dataset[i][1] for i in range(n)]


def _coco_data(run: Any, protocol: str, data_kind: str | None, data_path: str | None, split: str | None,
               n: int | None, seed: int) -> tuple[Any, Any, Any]:
    """(protocol, captions data set, reference data set) of a named COCO protocol (eval/protocols.py)."""
    from eval.protocols import coco_protocol
    from harness.data import open_dataset

    p = coco_protocol(protocol)
    if data_kind not in (None, "coco") or not data_path:
        raise FluidbenchError(f"--protocol {p.name}: needs --data-path, the COCO 2014 folder (data kind coco)")
    if split not in (None, p.prompt_split, p.prompt_split.removesuffix("2014")):
        raise FluidbenchError(f"--split {split}: protocol {p.name} takes its captions from {p.prompt_split}")
    n = n or p.n
    resolution = run.tokenizer.image_size
    prompts = open_dataset("coco", data_path, p.prompt_split, image_size=resolution, n=n, seed=seed)
    reference = prompts if p.same_images else open_dataset("coco", data_path, p.reference_split,
                                                           image_size=resolution)
    return p, prompts, reference


def eval_fid(run_dir: str | Path, *, n: int | None = None, split: str | None = None, seed: int = 0,
             data_kind: str | None = None, data_path: str | None = None, protocol: str | None = None,
             extractor: str | None = None, weights: str | None = None, cache_dir: str | Path | None = None,
             metrics: list[str] | str | None = None, n_boot: int = 100, floor: bool | None = None,
             result_file: str = "fid.json", settings: SamplingSettings | None = None, device: str | None = None,
             progress: bool = True) -> dict:
    """FID and the metric panel (eval/panel.py: KID, precision / recall, density / coverage, each with a bootstrap
    SE) of N samples for N captions, against cached reference statistics and features.

    The real images are the run's own validation data (N of them, default 1000), another data set's split
    (data_kind, data_path), or a named COCO protocol (`protocol`: "fluid", 30K train2014 captions against the same
    images; "imagen", 30K val2014 prompts against all of val2014; data_path the COCO folder). ShapesT2I defaults
    to the Shapes feature extractor (`weights` = its train-features folder), everything else to torch-fidelity's
    TF-compatible InceptionV3 (`weights` = its .pth file or the library's cache); `extractor` may also be
    `dinov2-vit-l-14` (FD-DINOv2, eval/dinov2.py) or `clip` (with metrics ["cmmd"]: CMMD, eval/cmmd.py), written
    to RUN/eval/`result_file` so each has its own file. `floor` (default: on for
    ShapesT2I) also scores N other real images (the train split) against the reference: what a perfect model
    would get at this N.
    """
    from eval.features_cache import extract_features, load_features, reference_features, save_features
    from eval.extractors import load_any_extractor
    from eval.fid import batches_from_dataset, default_cache_dir, reference_protocol
    from eval.panel import DEFAULT_METRICS, PanelSettings, panel
    from harness.data import RESIZE_FILTER

    run, device = _open(run_dir, device)
    settings = settings or SamplingSettings()
    if isinstance(metrics, str):  # the CLI's and a spec's comma-separated list
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    panel_settings = PanelSettings(metrics=tuple(metrics or DEFAULT_METRICS), n_boot=n_boot)
    resolution = run.tokenizer.image_size
    coco = None
    if protocol:
        coco, dataset, ref_data = _coco_data(run, protocol, data_kind, data_path, split, n, seed)
        kind, path, split, n = "coco", data_path, coco.prompt_split, len(dataset)
        ref_protocol = reference_protocol("coco", coco.reference_split, n if coco.same_images else None,
                                          seed if coco.same_images else 0, resolution, RESIZE_FILTER)
    else:
        n = n or 1000
        kind, path, split, dataset = _reference_data(run, data_kind, data_path, split, n, seed)
        ref_data = dataset
        ref_protocol = reference_protocol(kind, split, n, seed, resolution, resize_filter=RESIZE_FILTER, path=path)
    extractor = extractor or profile(kind).extractor
    ext = load_any_extractor(extractor, weights, device=device)
    cache_dir = cache_dir or default_cache_dir()
    reference, ref_features = reference_features(ref_protocol, batches_from_dataset(ref_data), ext, cache_dir,
                                                 progress="reference" if progress else None)
    captions = _captions(dataset, n)
    stats = SamplingStats()
    folder = Path(run_dir) / "eval" / "fid"
    samples = _cached_samples(folder, run, captions, settings, stats, progress)
    # the generated set's features, kept with its samples (the folder is emptied when the samples change)
    features_file = folder / f"features-{ext.name}-{ext.checksum[:12]}.npy"
    if features_file.is_file() and len(load_features(features_file, ext.dim)) == n:
        features = load_features(features_file, ext.dim)
    else:
        batches = (torch.from_numpy(samples[i:i + 64]).permute(0, 3, 1, 2) for i in range(0, n, 64))
        features, _ = extract_features(batches, ext, resolution=reference.key["resolution"],
                                       progress="features" if progress else None, total=n)
        save_features(features_file, features)
    result = panel(features, ref_features, panel_settings, reference_stats=reference.stats, device=device)
    result |= {"n_images": result["n_generated"], "reference": str(reference.path),
               "reference_protocol": reference.key}
    if floor if floor is not None else profile(kind).fid_floor:
        result["floor"] = _real_floor(kind, path, split, n, seed, resolution, ext, cache_dir, ref_features,
                                      reference, panel_settings, progress, device)
    described = asdict(ref_protocol) | {"extractor": ext.name, "captions_split": split, "n_captions": n}
    if coco is not None:
        described |= {"name": coco.name, "source": coco.source}
    result |= {"protocol": described, **_record(run, settings, stats)}
    # continuous tokens: do the sampled latents stay in the data's distribution? (a tokenizer without posterior
    # moments, such as a test's pixel stand-in, has no data latents to compare with)
    if stats.latents.n and hasattr(run.tokenizer, "encode_moments"):
        from eval.sampling import data_latent_stats, latent_comparison

        result["latents"] = latent_comparison(stats.latents,
                                              data_latent_stats(run.tokenizer, _real_batches(dataset, n), seed))
    # discrete tokens on a plain background: non-background codes per image, sampled against the same real images
    if stats.codes.images and getattr(run.tokenizer, "kind", None) == "vq" and profile(kind).plain_background:
        from eval.sampling import data_code_stats, paint_comparison

        result["paint"] = paint_comparison(stats.codes, data_code_stats(run.tokenizer, _real_batches(dataset, n)))
    write_json(Path(run_dir) / "eval" / result_file, result)
    return result


def _real_batches(dataset: Any, n: int, limit: int = 1000) -> Iterator[torch.Tensor]:
    """uint8 batches (64, 3, H, W) of the first min(n, limit) real images, for the token statistics beside the
    samples' (moments and code counts settle long before COCO-30K's 30,000 encodes would finish)."""
    m = min(n, limit)
    return (torch.stack([dataset[i][0] for i in range(k, min(k + 64, m))]) for k in range(0, m, 64))


def _real_floor(kind: str, path: Any, split: str, n: int, seed: int, resolution: int, ext: Any, cache_dir: Any,
                ref_features: torch.Tensor, reference: Any, settings: Any, progress: bool, device: str) -> dict:
    """The panel of N real images of another split against the reference: the floor a perfect model reaches at
    this N (FID is biased upwards at small N; Chong & Forsyth 2020)."""
    from dataclasses import replace

    from eval.features_cache import reference_features
    from eval.fid import batches_from_dataset, reference_protocol
    from eval.panel import panel
    from harness.data import RESIZE_FILTER, open_dataset

    other = ("val" if split.startswith("train") else "train") + ("2014" if split.endswith("2014") else "")
    real = open_dataset(kind, path, other, image_size=None if profile(kind).native_size else resolution, n=n,
                        seed=seed)
    protocol = reference_protocol(kind, other, n, seed, resolution, resize_filter=RESIZE_FILTER, path=path)
    _, features = reference_features(protocol, batches_from_dataset(real), ext, cache_dir,
                                     progress="floor images" if progress else None)
    out = panel(features, ref_features, replace(settings, n_boot=0), reference_stats=reference.stats, device=device)
    return {k: v for k, v in out.items() if k != "panel"} | {"split": other}


def _cached_samples(folder: Path, run: Any, captions: list[str], settings: SamplingSettings,
                    stats: SamplingStats, progress: bool) -> np.ndarray:
    """Samples for `captions`, stored losslessly as one uint8 .npy keyed by the captions and settings."""
    from harness.atomic import atomic_path

    record = _keyed_folder(folder, {"captions": captions, "settings": settings.resolved(run.variant),
                                    "step": run.step})
    path, made = folder / "samples.npy", record.get("made")
    if path.is_file() and made:  # reuse, with the cost (and latent moments) measured when they were made
        stats.images, stats.seconds, stats.cost = made["images"], made["seconds"], made["cost"]
        stats.latents = LatentStats(**made.get("latents", {}))
        stats.codes = CodeStats(**made.get("codes", {}))
        return np.load(path)
    images = np.stack([image for _, image in generate(run, captions, settings, stats, progress=progress,
                                                       desc="samples")])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, images)
    write_json(folder / "samples.json", {**record, "made": {"images": stats.images, "seconds": stats.seconds,
                                                            "cost": stats.cost, "latents": asdict(stats.latents),
                                                            "codes": asdict(stats.codes)}})
    return images


def eval_clipscore(run_dir: str | Path, *, n: int = 1000, split: str | None = None, seed: int = 0,
                   data_kind: str | None = None, data_path: str | None = None,
                   model: str | None = None, weights: str | None = None, settings: SamplingSettings | None = None,
                   device: str | None = None, progress: bool = True) -> dict:
    """CLIP score of N samples against their captions (the same captions and samples as FID with equal N and
    the same reference data)."""
    from eval.clipscore import DEFAULT_MODEL, clip_score, load_clip

    run, device = _open(run_dir, device)
    scorer = load_clip(model or DEFAULT_MODEL, weights, device=device)
    settings = settings or SamplingSettings()
    kind, _, split, dataset = _reference_data(run, data_kind, data_path, split, n, seed)
    captions = _captions(dataset, n)
    stats = SamplingStats()
    samples = _cached_samples(Path(run_dir) / "eval" / "fid", run, captions, settings, stats, progress)
    pairs = ((torch.from_numpy(samples[i:i + 32]).permute(0, 3, 1, 2), captions[i:i + 32])
             for i in range(0, len(captions), 32))
    result = clip_score(pairs, scorer, progress="clip score" if progress else None, total=len(captions))
    result |= {"protocol": {"dataset": kind, "split": split, "n": len(captions), "seed": seed},
               **_record(run, settings, stats)}
    write_json(Path(run_dir) / "eval" / "clipscore.json", result)
    return result
