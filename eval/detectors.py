"""Object detectors for GenEval behind one contract: raw instance detections (class, score, box, mask) per image.

Backends:
- `shapes-oracle`: the ShapesT2I oracle (eval/shapes_oracle.py); exact on rendered scenes and reports colours.
- `hf-mask2former`: transformers' Mask2Former (facebook/mask2former-swin-small-coco-instance layout) with
  mmdet-style resizing and post-processing. A different training run from GenEval's checkpoint, so its scores
  are labelled not comparable to published GenEval numbers.
- `mmdet`: GenEval's exact detector (Mask2Former Swin-S, mmdet 2.x), imported lazily; install on a GPU machine:
    pip install 'setuptools<81' && pip install --no-build-isolation mmcv-full==1.7.1 mmdet==2.27.0
  (GenEval's versions; mmcv builds from source, ~20 min), then
    wget -O DIR/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth https://download.openmmlab.com/mmdetection/v3.0/mask2former/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco/mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco_20220504_001756-c9d0c4f2.pth
Scores are left raw: the GenEval thresholds live in the scorer (eval/geneval.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import numpy as np

from eval.geneval_rules import Detection
from harness.errors import FluidbenchError

DETECTORS = ("shapes-oracle", "hf-mask2former", "mmdet")
HF_MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
MMDET_CHECKPOINT = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth"
MMDET_CONFIG = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
MMDET_INSTALL = ("pip install 'setuptools<81' && pip install --no-build-isolation mmcv-full==1.7.1 mmdet==2.27.0")
GENEVAL_NAMES_FILE = Path(__file__).parent / "geneval_data" / "object_names.txt"
# COCO label spellings (detectron2 / Hugging Face, older mmdet / VOC) -> GenEval's object_names.txt
COCO_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                "tvmonitor": "tv", "tv monitor": "tv", "motorbike": "motorcycle", "aeroplane": "airplane",
                "sofa": "couch", "pottedplant": "potted plant", "diningtable": "dining table",
                "hair dryer": "hair drier", "cellphone": "cell phone"}


def geneval_object_names() -> list[str]:
    """GenEval's 80 object names, in COCO's class order (the index an mmdet result list uses)."""
    return [line.strip() for line in GENEVAL_NAMES_FILE.read_text().splitlines() if line.strip()]


class Detector(ABC):
    """Contract: instance detections for a batch of RGB images, in GenEval's class names."""

    name: str  # the backend's name, recorded in summaries
    class_names: tuple[str, ...]  # every class this detector can report
    comparable: bool  # True only for GenEval's own detector: scores comparable to published GenEval numbers
    colors: bool  # True when detections carry `color` (no colour classifier needed)

    @abstractmethod
    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detect objects.

        Args:
            images: uint8 (H, W, 3) RGB arrays; sizes may differ.
        Returns:
            per image, its detections in any order, unthresholded: `class_name` in `class_names`, `score` in
            [0, 1], `box` (x0, y0, x1, y1) in pixels of that image (x1, y1 exclusive), `mask` bool (H, W) or
            None, `color` (a GenEval colour) when `colors` is True.
        """


class ShapesOracleDetector(Detector):
    """The ShapesT2I oracle: reads classes, colours, boxes and masks off flat-coloured rendered shapes."""

    name = "shapes-oracle"
    comparable = False
    colors = True

    def __init__(self):
        from eval import shapes_oracle
        self._detect = shapes_oracle.detect
        self.class_names = tuple(getattr(shapes_oracle, "CLASSES", ()))

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        return [list(self._detect(np.asarray(image))) for image in images]


def mmdet_resized_shape(height: int, width: int, short: int = 800, long: int = 1333) -> tuple[int, int]:
    """mmcv's `rescale_size` for img_scale (1333, 800), keep_ratio: the largest scale fitting both limits."""
    scale = min(long / max(height, width), short / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def masks_to_boxes(masks) -> "torch.Tensor":
    """mmdet's `mask2bbox`: tight (x0, y0, x1 + 1, y1 + 1) of each bool mask (N, H, W); zeros when empty."""
    import torch
    n = masks.shape[0]
    boxes = torch.zeros(n, 4, dtype=torch.float32)
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)
    for i in range(n):
        xs, ys = torch.where(cols[i])[0], torch.where(rows[i])[0]
        if len(xs) and len(ys):
            boxes[i] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def instance_postprocess(class_logits, mask_logits, max_per_image: int = 100):
    """mmdet 2.x MaskFormerFusionHead.instance_postprocess for one image.

    Args:
        class_logits: (Q, C + 1) with the last column "no object".
        mask_logits: (Q, H, W) at the original image size.
        max_per_image: how many (query, class) pairs to keep, ranked by class probability.
    Returns:
        labels (K,), scores (K,) = class probability x mean mask sigmoid over the binarised mask, masks (K, H, W)
        bool, boxes (K, 4).
    """
    import torch
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = class_logits.float().softmax(dim=-1)[:, :-1]  # (Q, C)
    k = min(max_per_image, num_queries * num_classes)
    top_probs, top = probs.flatten().topk(k, sorted=False)  # a query may appear under several classes
    labels, queries = top % num_classes, top // num_classes
    logits = mask_logits[queries].float()  # (K, H, W)
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, top_probs * mask_scores, binary, masks_to_boxes(binary.cpu())


class HFMask2FormerDetector(Detector):
    """transformers' Mask2Former with mmdet's test-time resizing, normalisation, padding and scoring."""

    name = "hf-mask2former"
    comparable = False  # not GenEval's checkpoint: label its numbers as such
    colors = False

    def __init__(self, model, image_mean: Sequence[float], image_std: Sequence[float], device: str = "cpu",
                 max_per_image: int = 100, size_divisor: int = 32):
        import torch
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        # the processor's mean/std are in [0, 1] units; mmdet normalises 0-255 pixels (123.675 = 0.485 * 255)
        self.mean = torch.tensor(image_mean, dtype=torch.float32, device=self.device).view(3, 1, 1) * 255
        self.std = torch.tensor(image_std, dtype=torch.float32, device=self.device).view(3, 1, 1) * 255
        self.max_per_image = max_per_image
        self.size_divisor = size_divisor
        names = geneval_object_names()
        label_names = {int(i): str(n) for i, n in model.config.id2label.items()}
        # model label index -> GenEval name; labels GenEval does not know (e.g. stuff classes) are dropped
        self.label_to_name = {}
        for i, label in label_names.items():
            name = COCO_ALIASES.get(label.lower(), label.lower())
            if name in names:
                self.label_to_name[i] = name
        if not self.label_to_name:
            raise FluidbenchError(f"Mask2Former labels {list(label_names.values())[:5]}... match none of GenEval's "
                                  f"object names ({GENEVAL_NAMES_FILE.name}): expected a COCO instance model")
        self.class_names = tuple(n for n in names if n in set(self.label_to_name.values()))

    def _inputs(self, images: Sequence[np.ndarray]):
        """mmdet's test pipeline: bilinear resize to uint8 (cv2 INTER_LINEAR), normalise, zero-pad to /32."""
        import torch
        import torch.nn.functional as F
        tensors, shapes = [], []
        for image in images:
            x = torch.from_numpy(np.array(image[..., :3])).to(self.device).permute(2, 0, 1).float()  # (3, H, W)
            h, w = mmdet_resized_shape(x.shape[1], x.shape[2])
            x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            x = x.round().clamp(0, 255)  # mmcv resizes the uint8 image
            tensors.append((x - self.mean) / self.std)
            shapes.append((h, w))
        d = self.size_divisor
        pad_h = -(-max(h for h, _ in shapes) // d) * d
        pad_w = -(-max(w for _, w in shapes) // d) * d
        # padding is 0 after normalisation, as mmdet's Pad
        batch = torch.zeros(len(images), 3, pad_h, pad_w, device=self.device)
        pixel_mask = torch.zeros(len(images), pad_h, pad_w, dtype=torch.long, device=self.device)
        for i, (x, (h, w)) in enumerate(zip(tensors, shapes)):
            batch[i, :, :h, :w] = x
            pixel_mask[i, :h, :w] = 1
        return batch, pixel_mask, shapes

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        # GenEval runs mmdet one image at a time, so padding depends only on the image's own size: batch only
        # images of one size, which pad alike (a bigger neighbour's padding would change Swin's windows)
        results: list[list[Detection]] = [[] for _ in images]
        by_size: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.shape[:2], []).append(i)
        for indices in by_size.values():
            for i, dets in zip(indices, self._detect_same_size([images[i] for i in indices])):
                results[i] = dets
        return results

    def _detect_same_size(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        import torch
        import torch.nn.functional as F
        batch, pixel_mask, shapes = self._inputs(images)
        with torch.no_grad():
            out = self.model(pixel_values=batch, pixel_mask=pixel_mask)
        results = []
        for i, image in enumerate(images):
            # as mmdet: masks to the padded input size, crop the padding, then to the original size
            masks = F.interpolate(out.masks_queries_logits[i:i + 1], size=batch.shape[-2:], mode="bilinear",
                                  align_corners=False)[0]
            h, w = shapes[i]
            masks = F.interpolate(masks[None, :, :h, :w], size=image.shape[:2], mode="bilinear",
                                  align_corners=False)[0]  # (Q, H, W)
            labels, scores, binary, boxes = instance_postprocess(out.class_queries_logits[i], masks,
                                                                 self.max_per_image)
            binary = binary.cpu().numpy()
            dets = []
            for j, label in enumerate(labels.tolist()):
                if label in self.label_to_name:
                    dets.append(Detection(self.label_to_name[label], float(scores[j]),
                                          tuple(float(v) for v in boxes[j]), binary[j]))
            results.append(dets)
        return results


def load_hf_mask2former(path: str | Path | None = None, device: str = "cpu") -> HFMask2FormerDetector:
    """Mask2Former from a local folder (config.json, model.safetensors, preprocessor_config.json), or from
    Hugging Face's cache / hub as facebook/mask2former-swin-small-coco-instance when `path` is None."""
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
    source = str(path) if path is not None else HF_MASK2FORMER
    if path is not None and not (Path(path) / "config.json").is_file():
        raise FluidbenchError(f"{path}: not a Mask2Former folder (expected config.json, model.safetensors and "
                              f"preprocessor_config.json, as in {HF_MASK2FORMER})")
    try:
        model = Mask2FormerForUniversalSegmentation.from_pretrained(source)
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FluidbenchError(f"could not load Mask2Former from {source}: {' '.join(str(e).split())[:300]} "
                              f"(pass --detector-path to a local copy of {HF_MASK2FORMER})") from None
    # only the normalisation comes from the processor: its own resize (384 or a stretch to /32) is not mmdet's
    return HFMask2FormerDetector(model, processor.image_mean, processor.image_std, device=device)


class MMDetDetector(Detector):
    """GenEval's own detector: mmdet 2.x Mask2Former Swin-S with its COCO checkpoint and config."""

    name = "mmdet"
    comparable = True
    colors = False

    def __init__(self, path: str | Path, config: str | Path | None = None, device: str = "cpu"):
        """`config`: an mmdet config file, which mmcv executes as Python: only one the caller names as code;
        by default the copy installed with mmdet, never a file found beside the checkpoint."""
        try:
            import mmdet
            import torch
            from mmcv.runner import load_state_dict
            from mmdet.apis import inference_detector, init_detector
        except ImportError:
            raise FluidbenchError(f"the mmdet detector needs mmdet 2.x and mmcv-full (not installed): "
                                  f"{MMDET_INSTALL}") from None
        checkpoint = Path(path) / MMDET_CHECKPOINT if Path(path).is_dir() else Path(path)
        if not checkpoint.is_file():
            raise FluidbenchError(f"{checkpoint}: GenEval's detector checkpoint not found (download it as "
                                  f"evaluation/download_models.sh in djghosh13/geneval does, named {MMDET_CHECKPOINT})")
        config = config or mmdet_config(Path(mmdet.__file__).parent)
        self._inference = inference_detector
        # mmcv's load_checkpoint would torch.load the file its own way; read it as weights only, then hand
        # mmcv the tensors (its load_state_dict also strips DataParallel's "module." prefixes, as it would)
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle, zip or torch errors, whichever the damage
            raise FluidbenchError(f"{checkpoint}: not a weights-only mmdet checkpoint "
                                  f"({' '.join(str(e).split())[:200]})") from None
        self.model = init_detector(str(config), None, device="cpu")
        load_state_dict(self.model, state.get("state_dict", state) if isinstance(state, dict) else state)
        self.model.to(device)
        self.class_names = tuple(geneval_object_names())

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        results = []
        for image in images:
            # mmdet takes arrays as BGR (cv2's order), as mmcv.imread gives it when GenEval passes a path
            out = self._inference(self.model, np.ascontiguousarray(image[..., ::-1]))
            bboxes, segms = (out[0], out[1] if len(out) > 1 else None) if isinstance(out, tuple) else (out, None)
            dets = []
            for index, name in enumerate(self.class_names):
                for j, row in enumerate(bboxes[index]):
                    mask = None if segms is None else np.asarray(segms[index][j], dtype=bool)
                    dets.append(Detection(name, float(row[4]), tuple(float(v) for v in row[:4]), mask))
            results.append(dets)
        return results


def mmdet_config(mmdet_dir: Path) -> Path:
    """GenEval's Mask2Former config as installed with mmdet (package code, like mmdet itself)."""
    candidates = [mmdet_dir / ".mim/configs/mask2former" / MMDET_CONFIG,
                  mmdet_dir.parent / "configs/mask2former" / MMDET_CONFIG]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FluidbenchError(f"{MMDET_CONFIG} not found in mmdet's configs ({candidates[0].parent}): install "
                              f"mmdet with its configs ({MMDET_INSTALL})")
    return found


def load_detector(name: str, path: str | Path | None = None, device: str = "cpu") -> Detector:
    """A detector by backend name (DETECTORS); `path` is the local weights folder where one is needed."""
    if name == "shapes-oracle":
        return ShapesOracleDetector()
    if name == "hf-mask2former":
        return load_hf_mask2former(path, device=device)
    if name == "mmdet":
        if path is None:
            raise FluidbenchError(f"--detector mmdet needs --detector-path: the folder holding {MMDET_CHECKPOINT}")
        return MMDetDetector(path, device=device)
    raise FluidbenchError(f"unknown detector '{name}' (expected one of {', '.join(DETECTORS)})")
