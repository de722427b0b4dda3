"""CLIP score: a tiny random open_clip model, saved as a local checkpoint file, loads through the same path as a
real one and scores image-prompt pairs as 100 * max(cos, 0)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.clipscore import clip_score, load_clip
from harness.errors import FluidbenchError

TINY = "fluidbench-tiny-clip"
TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Register a tiny architecture (open_clip's own config mechanism) and save random weights for it."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # open_clip initialises from the global generator
        model = open_clip.create_model(TINY)
    weights = folder / "open_clip_pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    return folder, weights, model


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_tiny_clip_loads_from_file_and_scores(tiny_clip):
    _, weights, model = tiny_clip
    scorer = load_clip(TINY, str(weights))
    assert scorer.pretrained == str(weights)
    for a, b in zip(scorer.net.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    images, prompts = _images(3), ["a photo of a red circle", "two squares", "a blue cross left of a circle"]
    scores = scorer.score(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert ((scores >= 0) & (scores <= 100)).all()

    # The definition, by hand: 100 * max(cos(image, text), 0) with open_clip's own preprocessing.
    from torchvision.transforms.functional import to_pil_image

    with torch.no_grad():
        pixels = torch.stack([scorer.preprocess(to_pil_image(im)) for im in images])
        cos = torch.cosine_similarity(model.encode_image(pixels), model.encode_text(scorer.tokenizer(prompts)))
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), rtol=1e-5, atol=1e-4)

    result = clip_score([(images[:2], prompts[:2]), (images[2:], prompts[2:])], scorer)
    assert result["n_images"] == 3 and result["model"] == TINY
    assert result["clip_score"] == pytest.approx(float(scores.double().mean()), rel=1e-6)


def test_local_dir_gives_the_same_scores(tiny_clip, tmp_path):
    _, weights, _ = tiny_clip
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(weights.read_bytes())
    images, prompts = _images(2, seed=3), ["a circle", "a square"]
    a = load_clip(f"local-dir:{tmp_path}").score(images, prompts)
    b = load_clip(TINY, weights).score(images, prompts)
    torch.testing.assert_close(a, b)


def test_clear_errors(tiny_clip, tmp_path):
    _, weights, _ = tiny_clip
    with pytest.raises(FluidbenchError, match="no such file"):
        load_clip(TINY, tmp_path / "missing.bin")
    with pytest.raises(FluidbenchError, match="not an open_clip architecture"):
        load_clip("no-such-arch", weights)
    wrong = tmp_path / "wrong.bin"
    torch.save({"visual.proj": torch.zeros(2, 2)}, wrong)
    with pytest.raises(FluidbenchError, match="not an open_clip"):
        load_clip(TINY, wrong)
    scorer = load_clip(TINY, weights)
    with pytest.raises(FluidbenchError, match="one prompt per image"):
        scorer.score(_images(2), ["only one"])
    with pytest.raises(FluidbenchError, match="expected uint8"):
        scorer.score(_images(2).float(), ["a", "b"])


def test_cli_clipscore_images(tiny_clip, tmp_path, capsys):
    from eval.geneval_folder import write_prompt_folder
    from harness.cli import main

    _, weights, _ = tiny_clip
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(["a photo of a circle", "a photo of two squares"]):
        images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
        write_prompt_folder(tmp_path / "imgs", i, {"tag": "single_object", "prompt": prompt, "include": []}, images)
    with pytest.raises(SystemExit) as e:
        main(["eval", "clipscore-images", "--images", str(tmp_path / "imgs"), "--clip-model", TINY,
              "--clip-weights", str(weights), "--device", "cpu", "--out", str(tmp_path / "clip.json")])
    assert e.value.code in (0, None)
    result = json.loads((tmp_path / "clip.json").read_text())
    assert result["n_images"] == 4 and 0 <= result["clip_score"] <= 100
    assert "CLIP score" in capsys.readouterr().out
