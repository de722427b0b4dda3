"""Shapes-FID's feature extractor: a small CNN trained on ShapesT2I's labels; its penultimate layer is the feature.

Inception features know nothing of flat-coloured 32x32 shapes, so ShapesT2I gets its own extractor, trained
(deterministically, in minutes on CPU) to read what the captions talk about: how many objects of each class and
of each colour, which class-colour pairs are present, and how many objects in all. A fifth, dense target, the
share of the image painted in each palette colour, teaches colours several times faster than the counts alone.
FID on its features then moves when generated scenes get shapes, colours, bindings or counts wrong. Saved as a
folder:

    DIR/model.pt        {"version", "config", "state_dict"}
    DIR/manifest.json   version, sha256 of model.pt, config, data set, training settings, held-out accuracy
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from harness.atomic import write_bytes, write_json
from harness.errors import FluidbenchError

VERSION = 1  # part of the extractor's name ("shapes-v1"): bump when the architecture or the labels change


@dataclass
class FeatureNetConfig:
    """Architecture and label vocabulary, saved with the weights."""

    classes: list[str]
    colors: list[str]
    palette: list[list[int]]  # RGB of each colour, in `colors` order (the data set's manifest)
    image_size: int = 32
    max_count: int = 4      # objects per class / colour / scene: ShapesT2I draws 1-4 per scene
    width: int = 16         # channels of the first stage; doubled at each of the three downsamplings
    feature_dim: int = 128


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # BatchNorm: in a short CPU budget it learned colours and shapes several times faster than GroupNorm.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class ShapesFeatureNet(nn.Module):
    """Conv stages 32 -> 16 -> 8 -> 4 px, mean + max pooling, one feature layer, and four label heads."""

    def __init__(self, cfg: FeatureNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.body = nn.Sequential(
            _conv(3, w), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w),
            _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w), _conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w))
        self.feature = nn.Sequential(nn.Linear(16 * w, cfg.feature_dim), nn.SiLU())
        k = cfg.max_count + 1
        n_cls, n_col = len(cfg.classes), len(cfg.colors)
        self.heads = nn.ModuleDict({
            "class_counts": nn.Linear(cfg.feature_dim, n_cls * k),   # per class: 0..max_count objects
            "color_counts": nn.Linear(cfg.feature_dim, n_col * k),   # per colour: 0..max_count objects
            "pairs": nn.Linear(cfg.feature_dim, n_cls * n_col),      # per (class, colour): present or not
            "total": nn.Linear(cfg.feature_dim, k),                  # objects in the scene
            "color_area": nn.Linear(cfg.feature_dim, n_col),         # share of pixels in each colour (x10)
        })

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> (B, feature_dim); other sizes are resized to the training size first."""
        x = images.float() / 127.5 - 1
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        h = self.body(x)  # (B, 8w, size / 8, size / 8)
        # Mean pooling counts (area adds up), max pooling detects (one small object is enough).
        return self.feature(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        b, k = len(f), self.cfg.max_count + 1
        return {"class_counts": self.heads["class_counts"](f).view(b, -1, k),   # (B, classes, k)
                "color_counts": self.heads["color_counts"](f).view(b, -1, k),   # (B, colours, k)
                "pairs": self.heads["pairs"](f),                                # (B, classes * colours)
                "total": self.heads["total"](f),                                # (B, k)
                "color_area": self.heads["color_area"](f)}                      # (B, colours)


def labels_from_records(records: list[dict], images: torch.Tensor, cfg: FeatureNetConfig) -> dict[str, torch.Tensor]:
    """ShapesT2I caption records (with their objects) and their uint8 images (N, 3, H, W) -> the label tensors."""
    cls_index = {c: i for i, c in enumerate(cfg.classes)}
    col_index = {c: i for i, c in enumerate(cfg.colors)}
    n = len(records)
    class_counts = np.zeros((n, len(cls_index)), np.int64)
    color_counts = np.zeros((n, len(col_index)), np.int64)
    pairs = np.zeros((n, len(cls_index), len(col_index)), np.float32)
    for i, record in enumerate(records):
        for obj in record["objects"]:
            a, b = cls_index[obj["class"]], col_index[obj["color"]]
            class_counts[i, a] += 1
            color_counts[i, b] += 1
            pairs[i, a, b] = 1
    total = class_counts.sum(axis=1)
    if total.max(initial=0) > cfg.max_count:
        raise FluidbenchError(f"a scene holds {total.max()} objects; the extractor counts up to {cfg.max_count}")
    palette = torch.tensor(cfg.palette, dtype=torch.uint8)  # (colours, 3)
    area = torch.cat([(chunk[:, None] == palette[None, :, :, None, None]).all(2).float().mean((2, 3))
                      for chunk in images.split(1000)])  # (N, colours)
    return {"class_counts": torch.from_numpy(class_counts), "color_counts": torch.from_numpy(color_counts),
            "pairs": torch.from_numpy(pairs.reshape(n, -1)), "total": torch.from_numpy(total),
            "color_area": area * 10}


# The pair head's BCE is a mean over every class-colour pair, nearly all absent: weighted up, it learns binding
# (val pairs exact 55% -> 81% at the default 1000 steps), and swapped colours move Shapes-FID further.
PAIRS_WEIGHT = 10.0


def _loss(out: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    k = out["total"].shape[-1]
    return (F.cross_entropy(out["class_counts"].reshape(-1, k), labels["class_counts"].reshape(-1))
            + F.cross_entropy(out["color_counts"].reshape(-1, k), labels["color_counts"].reshape(-1))
            + PAIRS_WEIGHT * F.binary_cross_entropy_with_logits(out["pairs"], labels["pairs"])
            + F.cross_entropy(out["total"], labels["total"])
            + F.mse_loss(out["color_area"], labels["color_area"]))


@torch.no_grad()
def accuracy(net: ShapesFeatureNet, images: torch.Tensor, labels: dict[str, torch.Tensor],
             batch_size: int = 500) -> dict[str, float]:
    """Per-head exact accuracy per image, and `scene`: every head right at once."""
    net.eval()
    right: dict[str, list[torch.Tensor]] = {"class_counts": [], "color_counts": [], "pairs": [], "total": []}
    for start in range(0, len(images), batch_size):
        out = net(images[start:start + batch_size])
        lab = {k: v[start:start + batch_size] for k, v in labels.items()}
        right["class_counts"].append((out["class_counts"].argmax(-1) == lab["class_counts"]).all(-1))
        right["color_counts"].append((out["color_counts"].argmax(-1) == lab["color_counts"]).all(-1))
        right["pairs"].append(((out["pairs"] > 0).float() == lab["pairs"]).all(-1))
        right["total"].append(out["total"].argmax(-1) == lab["total"])
    per_head = {k: torch.cat(v) for k, v in right.items()}
    scene = torch.stack(list(per_head.values())).all(0)
    return {**{k: float(v.float().mean()) for k, v in per_head.items()}, "scene": float(scene.float().mean())}


def _init(net: nn.Module, generator: torch.Generator) -> None:
    """Initialise every weight from `generator` (module constructors would draw from the global RNG)."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5, generator=generator)  # PyTorch's default scheme
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _load_split(data: str | Path, split: str) -> tuple[torch.Tensor, list[dict], dict]:
    from harness.data.shapes import ShapesDataset

    ds = ShapesDataset(data, split)
    images = torch.from_numpy(np.array(ds.images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return images, ds.records, ds.manifest


def train_features(data: str | Path, out: str | Path, *, steps: int = 1000, batch_size: int = 64,
                   lr: float = 2e-3, seed: int = 0, width: int = 16, feature_dim: int = 128,
                   progress: bool = True) -> dict:
    """Train the extractor on `data`/train, measure it on `data`/val, write it to `out`; returns its manifest."""
    from tqdm import tqdm

    start = time.perf_counter()
    images, records, manifest = _load_split(data, "train")
    val_images, val_records, _ = _load_split(data, "val")
    colors = manifest["colors"]  # {name: [r, g, b]}
    cfg = FeatureNetConfig(classes=list(manifest["classes"]), colors=list(colors),
                           palette=[list(rgb) for rgb in colors.values()], width=width,
                           image_size=int(manifest["image_size"]), feature_dim=feature_dim)
    labels = labels_from_records(records, images, cfg)
    val_labels = labels_from_records(val_records, val_images, cfg)

    generator = torch.Generator().manual_seed(seed)
    net = ShapesFeatureNet(cfg)
    _init(net, generator)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    # Cosine decay to zero: the last steps settle the weights, so the result depends little on where it stops.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s / steps, 1.0))))
    net.train()
    for _ in tqdm(range(steps), desc="train-features", disable=not progress, leave=False):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x = images[idx]
        flip = torch.rand(batch_size, generator=generator) < 0.5  # a mirrored scene has the same labels
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = _loss(net(x), {k: v[idx] for k, v in labels.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    val_accuracy = accuracy(net, val_images, val_labels)

    out = Path(out)
    # Saved through a buffer: torch.save names the archive after the file, and the temporary name is random, so
    # saving to the path directly would give a different checksum for the same weights.
    buffer = io.BytesIO()
    torch.save({"version": VERSION, "config": asdict(cfg), "state_dict": net.state_dict()}, buffer)
    write_bytes(out / "model.pt", buffer.getvalue())
    checksum = hashlib.sha256(buffer.getvalue()).hexdigest()
    info = {"name": f"shapes-v{VERSION}", "version": VERSION, "sha256": checksum,
            "config": asdict(cfg), "data": {"path": str(data), "manifest": manifest},
            "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                         "final_train_loss": loss.item()},
            "val_accuracy": val_accuracy, "wall_s": round(time.perf_counter() - start, 1)}
    write_json(out / "manifest.json", info)  # last: marks the folder complete
    return info


class ShapesFeatures:
    """The trained extractor behind eval.fid's FeatureExtractor interface."""

    def __init__(self, net: ShapesFeatureNet, checksum: str, device: str | torch.device = "cpu"):
        self.net = net.to(device).eval().requires_grad_(False)
        self.name = f"shapes-v{VERSION}"
        self.dim = net.cfg.feature_dim
        self.checksum = checksum

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return self.net.features(images.to(device))


def load_shapes_features(folder: str | Path, device: str | torch.device = "cpu") -> ShapesFeatures:
    """Load a folder written by `train_features`, checking its version and its checksum."""
    from harness.hashing import sha256_file

    folder = Path(folder)
    model_path, manifest_path = folder / "model.pt", folder / "manifest.json"
    if not model_path.is_file() or not manifest_path.is_file():
        raise FluidbenchError(f"--features {folder}: no model.pt + manifest.json (train one with "
                              f"`fluidbench eval train-features --data DIR --out {folder}`)")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    checksum = sha256_file(model_path)
    if checksum != manifest.get("sha256"):
        raise FluidbenchError(f"{model_path}: sha256 {checksum[:12]} differs from its manifest "
                              f"({str(manifest.get('sha256'))[:12]}): the file is corrupt or was replaced")
    saved = torch.load(model_path, map_location="cpu", weights_only=True)
    if saved.get("version") != VERSION:
        raise FluidbenchError(f"{model_path}: extractor version {saved.get('version')}, this code reads "
                              f"version {VERSION}; retrain with `fluidbench eval train-features`")
    net = ShapesFeatureNet(FeatureNetConfig(**saved["config"]))
    net.load_state_dict(saved["state_dict"])
    return ShapesFeatures(net, checksum, device)
