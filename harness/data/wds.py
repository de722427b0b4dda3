"""WebDataset tar shards: each sample is `<key>.<jpg|jpeg|png|webp>` + `<key>.txt`, adjacent in the tar.

Read with the standard library's tarfile (streaming), so a broken shard gives a one-line error naming it.
"""
from __future__ import annotations

import os
import posixpath
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

import torch

from harness.data.images import FILTERS, center_crop_resize, decode
from harness.errors import FluidbenchError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def resolve_shards(pattern: str) -> list[Path]:
    """Shard files for a path: a .tar file, a folder of .tar files, or a brace pattern (`a-{000..009}.tar`)."""
    path = Path(pattern)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FluidbenchError(f"{path}: no .tar shards in this folder")
        return shards
    if "{" in pattern:
        from braceexpand import braceexpand  # a dependency of webdataset

        shards = [Path(p) for p in braceexpand(pattern)]
        for shard in shards:
            if not shard.is_file():
                raise FluidbenchError(f"{shard}: WebDataset shard not found (from pattern {pattern})")
        return shards
    if not path.is_file():
        raise FluidbenchError(f"{path}: WebDataset shard or folder not found")
    return [path]


def check_complete(shard: Path) -> None:
    """An uncompressed tar must end with its end-of-archive marker (two zero blocks, POSIX ustar): tarfile reads
    a shard cut at a member boundary as a shorter, valid one. (A cut in a compressed shard fails to decompress.)"""
    with open(shard, "rb") as f:
        head = f.read(6)
        if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00":
            return
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size % 512 or tail != bytes(1024):
        raise FluidbenchError(f"{shard}: broken tar shard (truncated: {size} bytes, without tar's end-of-archive "
                              "marker)")


def read_shard(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) per sample; the key is the path up to the first dot of the file name."""
    key, files = None, {}
    try:
        with tarfile.open(shard, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = posixpath.split(member.name)
                if "." not in name:
                    continue
                stem, extension = name.split(".", 1)
                if posixpath.join(folder, stem) != key:
                    if key is not None:
                        yield key, files
                    key, files = posixpath.join(folder, stem), {}
                files[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise FluidbenchError(f"{shard}: broken tar shard ({e})") from None
    check_complete(shard)  # after tarfile's own checks, which name a cut inside a member
    if key is not None:
        yield key, files


class WebDatasetShards(torch.utils.data.IterableDataset):
    """Image-caption pairs streamed from tar shards: (uint8 tensor (3, S, S), caption), in shard order."""

    def __init__(self, path: str | Path, split: str = "train", image_size: int = 256, n: int | None = None,
                 resize_filter: str = "bicubic"):
        if resize_filter not in FILTERS:
            raise FluidbenchError(f"resize filter '{resize_filter}': expected one of {', '.join(FILTERS)}")
        if n is not None and n < 1:
            raise FluidbenchError(f"n={n}: expected a positive number of samples")
        self.shards = resolve_shards(str(path).replace("{split}", split))
        self.image_size, self.n, self.resize_filter = image_size, n, resize_filter

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        shards, limit = self.shards, self.n
        worker = torch.utils.data.get_worker_info()
        if worker is not None:  # each DataLoader worker reads its own shards (and its share of n)
            shards = shards[worker.id::worker.num_workers]
            limit = None if limit is None else -(-limit // worker.num_workers)
        count = 0
        for shard in shards:
            for key, files in read_shard(shard):
                if limit is not None and count >= limit:
                    return
                image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
                if image is None or "txt" not in files:
                    raise FluidbenchError(f"{shard}: sample '{key}' needs an image ({'/'.join(IMAGE_EXTENSIONS)}) "
                                          f"and a .txt caption, has {sorted(files)}")
                caption = " ".join(files["txt"].decode("utf-8", errors="replace").split())
                yield center_crop_resize(decode(image, f"{shard}: sample '{key}'"), self.image_size,
                                         self.resize_filter), caption
                count += 1
        if worker is None and limit is not None and count < limit:
            raise FluidbenchError(f"{self.shards[0].parent}: the shards hold {count} samples, fewer than the "
                                  f"{limit} asked for")
