"""Real-data loaders on tiny fixtures built here: a fake COCO 2014 folder (three images) and a five-sample tar."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import open_dataset
from harness.data.coco import CocoCaptions
from harness.data.wds import WebDatasetShards
from harness.errors import FluidbenchError

GREEN, RED, BLUE = (0, 200, 0), (200, 0, 0), (0, 0, 200)


def striped(width: int, height: int) -> Image.Image:
    """A green image whose outer bands (beyond the central square) are red (left/top) and blue (right/bottom)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = GREEN
    side = min(width, height)
    if width > height:
        pixels[:, :(width - side) // 2], pixels[:, (width + side) // 2:] = RED, BLUE
    else:
        pixels[:(height - side) // 2], pixels[(height + side) // 2:] = RED, BLUE
    return Image.fromarray(pixels)


def make_coco(root: Path, split: str = "val") -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / f"{split}2014").mkdir()
    sizes = {1: (80, 40), 2: (30, 60), 3: (48, 48)}
    for image_id, (w, h) in sizes.items():
        image = striped(w, h)
        (image.convert("L") if image_id == 3 else image).save(root / f"{split}2014" / f"COCO_{image_id:012d}.jpg",
                                                                quality=95)
    annotations = {
        "images": [{"id": i, "file_name": f"COCO_{i:012d}.jpg", "width": w, "height": h} for i, (w, h) in sizes.items()],
        "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"image {i}  caption {k}\n"}
                        for i in sizes for k in range(1 + i)],
    }
    path = root / "annotations" / f"captions_{split}2014.json"
    path.write_text(json.dumps(annotations))
    return path


def test_coco_items_are_centre_cropped_and_resized(tmp_path):
    make_coco(tmp_path)
    dataset = open_dataset("coco", tmp_path, "val", image_size=16)
    assert len(dataset) == 3
    for i in range(3):
        image, caption = dataset[i]
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 16, 16)
        assert caption.startswith(f"image {i + 1} caption ")  # whitespace normalised
        centre = image.float().mean(dim=(1, 2))
        if i < 2:  # colour images: only the green central square survives the crop (JPEG: roughly)
            assert centre[1] > 150 and centre[0] < 40 and centre[2] < 40, centre
    assert dataset[2][0][0].equal(dataset[2][0][1])  # the grayscale image became RGB
    assert tuple(open_dataset("coco", tmp_path, "val")[0][0].shape) == (3, 256, 256)  # the paper's default


def test_coco_sample_is_seeded(tmp_path):
    make_coco(tmp_path)
    a = CocoCaptions(tmp_path, "val", image_size=8, n=2, seed=5)
    b = CocoCaptions(tmp_path, "val", image_size=8, n=2, seed=5)
    assert a.items == b.items and len(a) == 2
    draws = {tuple(CocoCaptions(tmp_path, "val", image_size=8, n=2, seed=s).items) for s in range(12)}
    assert len(draws) > 2  # different seeds, different samples or captions
    for name, caption in a.items:  # each caption belongs to its image
        assert caption.startswith(f"image {int(name[5:17])} ")
    with pytest.raises(FluidbenchError, match="n=4"):
        CocoCaptions(tmp_path, "val", n=4)


def test_coco_errors_name_the_file(tmp_path):
    with pytest.raises(FluidbenchError, match="COCO folder not found"):
        CocoCaptions(tmp_path / "nowhere", "val")
    path = make_coco(tmp_path)
    with pytest.raises(FluidbenchError, match="captions_train2014.json: COCO captions file not found"):
        CocoCaptions(tmp_path, "train")
    path.write_text('{"images": [')
    with pytest.raises(FluidbenchError, match="captions_val2014.json: malformed JSON"):
        CocoCaptions(tmp_path, "val")
    path.write_text('{"images": []}')
    with pytest.raises(FluidbenchError, match="not a COCO captions file"):
        CocoCaptions(tmp_path, "val")
    path.write_text('{"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "x"}]}')
    with pytest.raises(FluidbenchError, match="malformed COCO entry.*file_name"):
        CocoCaptions(tmp_path, "val")
    path.write_text('{"images": [{"id": 7, "file_name": "gone.jpg"}], "annotations": [{"image_id": 7, "caption": "x"}]}')
    with pytest.raises(FluidbenchError, match="gone.jpg: image listed in .* not found"):
        CocoCaptions(tmp_path, "val")[0]


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_shard(path: Path, n: int = 5, start: int = 0) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            for name, data in ((f"sample{i:04d}.png", png(striped(40 + i, 32))),
                               (f"sample{i:04d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_yield_image_caption_pairs(tmp_path):
    shard = make_shard(tmp_path / "shard-000.tar")
    items = list(open_dataset("wds", shard, "train", image_size=16))
    assert [c for _, c in items] == [f"caption {i}" for i in range(5)]
    for image, _ in items:
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 16, 16)
        assert (image[1] == 200).all() and (image[0] == 0).all()  # lossless PNG: the green centre exactly
    assert len(list(WebDatasetShards(shard, image_size=8, n=3))) == 3
    make_shard(tmp_path / "shard-001.tar", n=2, start=5)
    for source in (tmp_path, str(tmp_path / "shard-{000..001}.tar")):
        assert [c for _, c in WebDatasetShards(source, image_size=8)] == [f"caption {i}" for i in range(7)]
    (tmp_path / "val").mkdir()
    make_shard(tmp_path / "val" / "a.tar", n=1)
    assert len(list(open_dataset("webdataset", str(tmp_path / "{split}"), "val", image_size=8))) == 1


def test_webdataset_errors_name_the_shard(tmp_path):
    with pytest.raises(FluidbenchError, match="missing.tar: WebDataset shard or folder not found"):
        WebDatasetShards(tmp_path / "missing.tar")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(make_shard(tmp_path / "good.tar").read_bytes()[:3000])  # cut inside the first sample
    with pytest.raises(FluidbenchError, match="broken.tar: broken tar shard"):
        list(WebDatasetShards(broken, image_size=8))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(FluidbenchError, match="junk.tar: broken tar shard"):
        list(WebDatasetShards(junk, image_size=8))
    lonely = tmp_path / "lonely.tar"
    with tarfile.open(lonely, "w") as tar:
        info = tarfile.TarInfo("x.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(FluidbenchError, match="sample 'x' needs an image"):
        list(WebDatasetShards(lonely, image_size=8))


def test_open_dataset_rejects_unknown_kinds_and_filters(tmp_path):
    with pytest.raises(FluidbenchError, match="data kind 'imagenet'"):
        open_dataset("imagenet", tmp_path)
    make_coco(tmp_path)
    with pytest.raises(FluidbenchError, match="resize filter 'cubic'"):
        open_dataset("coco", tmp_path, "val", resize_filter="cubic")
