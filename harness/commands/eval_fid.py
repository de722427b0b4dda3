"""CLI: `fluidbench eval fid-ref | train-features | fid-images | clipscore-images`.

FID and CLIP score of images that already exist (a folder of PNGs, GenEval's layout, or a uint8 .npy), and the
pieces they need: reference statistics of real images and the ShapesT2I feature extractor. Sampling a run and
scoring it (`fluidbench eval fid --run RUN`) builds on the same functions in eval/fid.py and eval/clipscore.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from harness.errors import FluidbenchError

def _device(device: str) -> str:
    from harness.devices import default_device

    return str(default_device(device))


def _extractor(name: str, inception_weights: Optional[Path], features: Optional[Path], device: str):
    from eval.fid import load_extractor

    return load_extractor(name, inception_weights if name.startswith("inception") else features, _device(device))


def _default_features(data_path: Path) -> Path:
    """The Shapes extractor lives beside the data it was trained on, unless --features says otherwise."""
    from eval.shapes_features import VERSION

    return data_path / "features" / f"shapes-v{VERSION}"


def _protocol(data: str, path: Path, split: str, n: Optional[int], seed: int, resolution: Optional[int],
              resize_filter: Optional[str]):
    """Resolve the reference protocol's settings and open the data set that realises them."""
    from eval.fid import reference_protocol
    from harness.data import RESIZE_FILTER, open_dataset, profile

    if profile(data).native_size:
        dataset = open_dataset(data, path, split, image_size=resolution, n=n, seed=seed)
        return reference_protocol(data, split, n, seed, dataset.image_size, path=path), dataset
    resolution, resize_filter = resolution or 256, resize_filter or RESIZE_FILTER
    dataset = open_dataset(data, path, split, image_size=resolution, n=n, seed=seed, resize_filter=resize_filter)
    return reference_protocol(data, split, n, seed, resolution, resize_filter, path=path), dataset


def fid_ref(
    data: str = typer.Option(..., help="Real images: coco | shapes | wds (WebDataset shards)."),
    path: Path = typer.Option(..., help="Data folder (COCO: the folder with annotations/ and the images)."),
    protocol: Optional[str] = typer.Option(None, help="coco: a published protocol (docs/protocols.md), fluid "
                                           "(default: train2014, 30000 images) | imagen (val2014, the whole split)."),
    split: Optional[str] = typer.Option(None, help="coco: the protocol's (train2014 for fluid, val2014 for imagen); "
                                        "shapes: train|val (default val)."),
    n: Optional[int] = typer.Option(None, help="Images to use; default the protocol's for coco, the whole split "
                                    "otherwise."),
    seed: int = typer.Option(0, help="Which N images (and which caption of each)."),
    resolution: Optional[int] = typer.Option(None, help="Generation resolution; default 256, native for shapes."),
    resize_filter: Optional[str] = typer.Option(None, help="Filter after the centre crop; default bicubic."),
    extractor: Optional[str] = typer.Option(None, help="inception | shapes; default shapes for ShapesT2I."),
    inception_weights: Optional[Path] = typer.Option(None, help="torch-fidelity's Inception .pth file."),
    features: Optional[Path] = typer.Option(None, help="Shapes extractor folder; default PATH/features/shapes-v1."),
    cache: Optional[Path] = typer.Option(None, help="Stats folder; default $FLUIDBENCH_FID_CACHE, results/fid-ref."),
    batch_size: int = typer.Option(64, min=1),
    workers: int = typer.Option(0, min=0, help="DataLoader workers for decoding real images."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    rebuild: bool = typer.Option(False, help="Recompute even when cached."),
) -> None:
    """Build (or find) the reference statistics and per-image features of real images for one FID protocol (the
    features serve KID, precision / recall and the bootstrap); prints the statistics' path."""
    from eval.features_cache import reference_features
    from eval.fid import batches_from_dataset, default_cache_dir

    from harness.data import PROFILES

    if data not in PROFILES:
        raise FluidbenchError(f"--data {data}: expected one of {', '.join(PROFILES)}")
    if data == "coco":  # the named protocols are COCO's (eval/protocols.py)
        from eval.protocols import coco_protocol

        p = coco_protocol(protocol)
        if protocol and split not in (None, p.reference_split, p.reference_split.removesuffix("2014")):
            raise FluidbenchError(f"--split {split}: protocol {p.name}'s reference images are {p.reference_split}")
        if split is None or protocol:
            split, n = p.reference_split, n or p.reference_n
        if n is None and not protocol:
            n = PROFILES[data].reference_n
        if n is None:
            seed = 0  # the whole split: the seed picks nothing, and eval fid --protocol imagen looks for seed 0
    elif protocol:
        raise FluidbenchError(f"--protocol {protocol}: the named protocols are COCO's (--data coco)")
    else:
        n = PROFILES[data].reference_n if n is None else n
    split = split or "val"
    extractor = extractor or PROFILES[data].extractor
    features = features or _default_features(path)
    net = _extractor(extractor, inception_weights, features, device)
    protocol, dataset = _protocol(data, path, split, n, seed, resolution, resize_filter)
    total = len(dataset) if hasattr(dataset, "__len__") else n
    ref, _ = reference_features(protocol, batches_from_dataset(dataset, batch_size, workers), net,
                                cache or default_cache_dir(), rebuild=rebuild, total=total)
    typer.echo(f"{ref.path}  ({ref.stats.n} images, {ref.key['extractor']})")


def train_features_cmd(
    data: Path = typer.Option(..., help="ShapesT2I folder (`fluidbench data shapes --out DIR`)."),
    out: Optional[Path] = typer.Option(None, help="Output folder; default DATA/features/shapes-v1."),
    steps: int = typer.Option(1000, min=1),
    batch_size: int = typer.Option(64, min=2),
    lr: float = typer.Option(2e-3),
    width: int = typer.Option(16, min=4, help="Channels of the first stage."),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (default: torch's own)."),
) -> None:
    """Train the ShapesT2I feature extractor used by Shapes-FID (deterministic; minutes on a CPU)."""
    import torch

    from eval.shapes_features import train_features

    if threads:
        torch.set_num_threads(threads)
    out = out or _default_features(data)
    info = train_features(data, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, width=width)
    acc = info["val_accuracy"]
    typer.echo(f"{out}: val accuracy scene {acc['scene']:.3f} (class counts {acc['class_counts']:.3f}, colour "
               f"counts {acc['color_counts']:.3f}, pairs {acc['pairs']:.3f}, total {acc['total']:.3f}), "
               f"{info['wall_s']:.0f} s")


def fid_images(
    images: Path = typer.Option(..., help="Folder of PNGs (flat or GenEval layout) or a uint8 (N, H, W, 3) .npy."),
    ref: Path = typer.Option(..., help="Reference statistics (.npz) from `fluidbench eval fid-ref`."),
    inception_weights: Optional[Path] = typer.Option(None, help="torch-fidelity's Inception .pth file."),
    features: Optional[Path] = typer.Option(None, help="Shapes extractor folder (for Shapes-FID references)."),
    limit: Optional[int] = typer.Option(None, min=2, help="Use at most this many images."),
    batch_size: int = typer.Option(64, min=1),
    device: str = typer.Option("auto"),
    out: Optional[Path] = typer.Option(None, help="Write the result (with its protocol) to this JSON file."),
) -> None:
    """FID of existing images against cached reference statistics."""
    from eval.fid import batches_from_files, fid_from_images, image_files, load_reference_stats
    from harness.atomic import write_json

    reference = load_reference_stats(ref)
    name = reference.key["extractor"]
    if not name.startswith("inception") and features is None:
        raise FluidbenchError(f"--features: {ref} was computed with {name}; pass the extractor folder")
    net = _extractor(name, inception_weights, features, device)
    paths = image_files(images)
    result = fid_from_images(batches_from_files(paths, batch_size), reference, net, limit=limit,
                             total=None if paths[0].suffix == ".npy" else min(len(paths), limit or len(paths)))
    result["images"] = str(images)
    if out:
        write_json(out, result)
    typer.echo(f"FID {result['fid']:.4f}  ({result['n_images']} images vs {reference.stats.n}, {name})")


def clipscore_images(
    images: Path = typer.Option(..., help="A GenEval-layout folder: <index>/metadata.jsonl + <index>/samples/*.png."),
    clip_model: str = typer.Option("ViT-L-14-quickgelu", help="open_clip architecture (or local-dir:/path)."),
    clip_weights: Optional[str] = typer.Option(None, help="Local open_clip checkpoint file (or a pretrained tag)."),
    batch_size: int = typer.Option(32, min=1),
    device: str = typer.Option("auto"),
    out: Optional[Path] = typer.Option(None, help="Write the result to this JSON file."),
) -> None:
    """CLIP score of the images in a GenEval-layout folder against their prompts."""
    import numpy as np
    import torch
    from PIL import Image

    from eval.clipscore import clip_score, load_clip
    from eval.geneval_folder import iter_prompt_folders
    from harness.atomic import write_json

    items = [(p, meta["prompt"]) for _, meta, paths in iter_prompt_folders(images, strict=True) for p in paths]
    if not items:
        raise FluidbenchError(f"--images {images}: no <index>/samples/*.png with metadata.jsonl found")

    def batches():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            pixels = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p, _ in chunk]
            yield torch.stack(pixels), [prompt for _, prompt in chunk]

    scorer = load_clip(clip_model, clip_weights, _device(device))
    result = clip_score(batches(), scorer, progress="clip score", total=len(items))
    result["images"] = str(images)
    if out:
        write_json(out, result)
    typer.echo(f"CLIP score {result['clip_score']:.3f}  ({result['n_images']} images, {clip_model})")


def register(app: typer.Typer) -> None:
    app.command("fid-ref")(fid_ref)
    app.command("train-features")(train_features_cmd)
    app.command("fid-images")(fid_images)
    app.command("clipscore-images")(clipscore_images)
