"""Colour classifiers for GenEval's colour clauses: CLIP zero-shot (GenEval's way) or the detections' own colours.

GenEval (evaluation/evaluate_images.py) composites each object's mask over a #999999 background, crops to its
box, and classifies the crop zero-shot with CLIP ViT-L/14 (OpenAI weights) over its 10 colours, each colour's
text embedding the normalised mean of three normalised template embeddings (clip_benchmark's
`zero_shot_classifier`). open_clip >= 2.29 builds `ViT-L-14` with GELU even for the OpenAI weights, which were
trained with QuickGELU, so we name `ViT-L-14-quickgelu` (open_clip builds `ViT-L-14` with plain GELU and
only warns when given the OpenAI weights).
"""
from __future__ import annotations

import pickle
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from eval.geneval_rules import COLORS, Detection
from harness.errors import FluidbenchError

CLIP_ARCH = "ViT-L-14-quickgelu"
CLIP_PRETRAINED = "openai"
TEMPLATES = ("a photo of a {c} {object}", "a photo of a {c}-colored {object}", "a photo of a {c} object")
BACKGROUND = (153, 153, 153)  # GenEval's default bgcolor "#999"
# files a local CLIP folder may hold, in the order we look for them (open_clip's HF layout, then OpenAI's)
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "ViT-L-14.pt")


class ColorClassifier(ABC):
    """Contract: names the colour of detected objects, one of GenEval's 10 COLORS each."""

    name: str

    @abstractmethod
    def classify(self, image: np.ndarray, detections: Sequence[Detection], class_name: str) -> list[str]:
        """Colour names for some objects of one class in one image.

        Args:
            image: uint8 (H, W, 3) RGB, the image the detections came from.
            detections: objects of `class_name` in it, each with `box` (x0, y0, x1, y1, pixels) and, where the
                detector gives one, `mask` (bool (H, W)).
            class_name: their class (the CLIP templates name it).
        Returns:
            one colour name from COLORS per detection, in the same order.
        """


class DetectionColors(ColorClassifier):
    """The colours the detector itself reports (the ShapesT2I oracle knows each shape's colour exactly)."""

    name = "detector"

    def classify(self, image: np.ndarray, detections: Sequence[Detection], class_name: str) -> list[str]:
        missing = [d for d in detections if d.color is None]
        if missing:
            raise FluidbenchError(f"detections of '{class_name}' carry no colour: use a CLIP colour classifier")
        return [d.color for d in detections]


def crop_object(image: np.ndarray, detection: Detection):
    """The PIL crop GenEval classifies: the object's mask over #999999 (when there is a mask), cut to its box."""
    from PIL import Image
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if detection.mask is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != image.shape[:2]:
            raise FluidbenchError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
        picture = Image.composite(picture, Image.new("RGB", picture.size, BACKGROUND), Image.fromarray(mask))
    x0, y0, x1, y1 = (float(v) for v in detection.box[:4])
    # PIL rounds float boxes itself, as in the official crop; keep at least one pixel so a degenerate box
    # (where the official code would crash) still gets a label
    return picture.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


class ClipColors(ColorClassifier):
    """Zero-shot CLIP colour classification with GenEval's templates, on masked crops over #999999."""

    def __init__(self, model, preprocess, tokenizer, name: str = f"clip:{CLIP_ARCH}:{CLIP_PRETRAINED}"):
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self._text: dict[str, object] = {}  # class name -> (D, 10) colour embeddings (templates name the class)

    def _autocast(self):
        import contextlib

        import torch
        device = next(self.model.parameters()).device
        # clip_benchmark runs under CUDA autocast (fp16), as GenEval did; CPU stays fp32
        return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()

    def text_embeddings(self, class_name: str):
        """(D, 10): per colour, the normalised mean of the normalised template embeddings."""
        import torch
        import torch.nn.functional as F
        if class_name not in self._text:
            device = next(self.model.parameters()).device
            columns = []
            with torch.no_grad(), self._autocast():
                for color in COLORS:
                    texts = [t.format(c=color, object=class_name) for t in TEMPLATES]
                    emb = F.normalize(self.model.encode_text(self.tokenizer(texts).to(device)).float(), dim=-1)
                    mean = emb.mean(dim=0)
                    columns.append(mean / mean.norm())
            self._text[class_name] = torch.stack(columns, dim=1)  # (D, 10)
        return self._text[class_name]

    def classify(self, image: np.ndarray, detections: Sequence[Detection], class_name: str) -> list[str]:
        import torch
        import torch.nn.functional as F
        if not detections:
            return []
        device = next(self.model.parameters()).device
        crops = torch.stack([self.preprocess(crop_object(image, d)) for d in detections]).to(device)
        with torch.no_grad(), self._autocast():
            features = F.normalize(self.model.encode_image(crops).float(), dim=-1)  # (N, D)
            logits = 100.0 * features @ self.text_embeddings(class_name)  # (N, 10)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


def _is_torchscript(path: Path) -> bool:
    """OpenAI's own ViT-L-14.pt is a TorchScript archive, which torch.load refuses with weights_only=True.
    Only decides whether to refuse or (when asked for) allow the unsafe path; a state dict never takes it."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") for name in zf.namelist())


def load_clip_colors(path: str | Path | None = None, arch: str = CLIP_ARCH,
                     device: str = "cpu", torchscript: bool = False) -> ClipColors:
    """GenEval's CLIP colour classifier from local weights, or open_clip's own download location.

    Args:
        path: a folder in open_clip's Hugging Face layout (open_clip_config.json + open_clip_model.safetensors,
            e.g. a snapshot of timm/vit_large_patch14_clip_224.openai), a folder holding one of CLIP_FILES, or a
            weights file for `arch` (an open_clip state dict, or OpenAI's TorchScript ViT-L-14.pt). None: open_clip
            fetches `arch` + "openai" into its cache (needs internet the first time).
        arch: the open_clip architecture for a weights file.
        device: where the model runs.
        torchscript: allow a TorchScript archive (OpenAI's ViT-L-14.pt). Loading one unpickles it and runs its
            code, so a file from elsewhere could run anything: it is refused unless asked for here. Everything
            else loads with `weights_only=True` or from safetensors.
    """
    import open_clip
    model_name, pretrained, weights_only = arch, CLIP_PRETRAINED, True
    if path is not None:
        path = Path(path)
        if path.is_dir() and (path / "open_clip_config.json").is_file():
            model_name, pretrained = f"local-dir:{path}", None
        elif path.is_dir():
            found = [path / f for f in CLIP_FILES if (path / f).is_file()]
            if not found:
                raise FluidbenchError(f"{path}: no CLIP weights (expected open_clip_config.json + "
                                      f"open_clip_model.safetensors, or one of {', '.join(CLIP_FILES)})")
            path = found[0]
        elif not path.is_file():
            raise FluidbenchError(f"{path}: CLIP weights not found (expected a {arch} weights file or folder, "
                                  f"e.g. OpenAI's ViT-L-14.pt)")
        if path.is_file():
            pretrained = str(path)
            if _is_torchscript(path):
                if not torchscript:
                    raise FluidbenchError(f"{path}: a TorchScript archive (as OpenAI's ViT-L-14.pt); loading one "
                                          "runs the code it holds, so it is refused unless asked for "
                                          "(`eval geneval-score --clip-torchscript`); or use open_clip's "
                                          "safetensors, e.g. timm/vit_large_patch14_clip_224.openai")
                weights_only = False
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, weights_only=weights_only)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
        where = path if path is not None else f"open_clip's cache ({arch}, {CLIP_PRETRAINED})"
        raise FluidbenchError(f"could not load CLIP weights from {where}: {' '.join(str(e).split())[:300]} "
                              "(pass --clip-path to a local ViT-L-14.pt or open_clip folder)") from None
    tokenizer = open_clip.get_tokenizer(model_name)
    label = str(path) if path is not None else f"{arch}:{CLIP_PRETRAINED}"
    return ClipColors(model, preprocess, tokenizer, name=f"clip:{label}")
