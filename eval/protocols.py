"""The published COCO FID protocols, by name: which captions are sampled and which real images they are scored
against (docs/protocols.md gives the sources and what each number can be compared with).

- `fluid`: 30K images of COCO-2014 *train*, one seeded caption each; the reference statistics are those same 30K
  images (Fluid, arXiv 2410.13863: its FID-30K and its scaling plots). The default.
- `imagen`: 30K prompts sampled from COCO-2014 *val*; the reference is the whole val2014 split (40,504 images):
  Imagen's zero-shot FID-30K (arXiv 2205.11487, section 4.1), which it describes as that of previous work (GLIDE,
  DALL-E 2).
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.errors import FluidbenchError


@dataclass(frozen=True)
class CocoProtocol:
    """Captions to sample from, and the real images the samples are compared with."""

    name: str
    prompt_split: str            # captions (one per image, seeded) from this split
    n: int                       # generated images (one per caption)
    reference_split: str
    reference_n: int | None      # None = the whole split; else the same N images the captions came from
    source: str

    @property
    def same_images(self) -> bool:
        """Whether the reference is exactly the images whose captions were sampled."""
        return self.reference_n is not None


PROTOCOLS = {
    "fluid": CocoProtocol("fluid", "train2014", 30000, "train2014", 30000,
                          "Fluid (Fan et al. 2024, arXiv 2410.13863): 30K COCO-2014 train images and their captions"),
    "imagen": CocoProtocol("imagen", "val2014", 30000, "val2014", None,
                           "Imagen (Saharia et al. 2022, arXiv 2205.11487, sec. 4.1), after GLIDE / DALL-E 2: 30K "
                           "val2014 prompts against the full val2014 set"),
}
DEFAULT_PROTOCOL = "fluid"


def coco_protocol(name: str | None) -> CocoProtocol:
    """The protocol called `name` (None = the default, Fluid's)."""
    name = name or DEFAULT_PROTOCOL
    if name not in PROTOCOLS:
        raise FluidbenchError(f"--protocol {name}: unknown (expected one of {', '.join(PROTOCOLS)})")
    return PROTOCOLS[name]
