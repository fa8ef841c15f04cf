"""fastsae/activations.py: hook points of any nn.Module (a tiny randomly initialised GPT-2 built from a
config, no download), padding and special tokens dropped, the shuffling buffer, the disk cache."""

import pytest
import torch
from torch import nn

from fastsae.activations import ActivationStream, capture

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the cat sat on a mat dog ran far away from my old red house".split()
SPECIAL = ["[PAD]", "[UNK]", "[BOS]"]


def _tokenizer():
    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]"
    )


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=len(SPECIAL) + len(WORDS),
                                  n_positions=64, bos_token_id=2, eos_token_id=2)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg).eval()


def _texts(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = int(torch.randint(1, 12, (1,), generator=generator))
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)]
        texts.append(" ".join(["[BOS]", *words]))
    return texts


def test_capture_reads_hook_points_and_stops_after_the_last():
    model, tokenizer = _gpt2(), _tokenizer()
    inputs = dict(tokenizer(_texts(4), padding=True, return_tensors="pt"))
    ran_last_block = []
    model.transformer.h[2].register_forward_hook(lambda *args: ran_last_block.append(True))
    outputs = capture(model, ["transformer.h.0", "transformer.wte"], inputs)
    assert not ran_last_block, "the forward pass went on past the last hook point"
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(outputs["transformer.h.0"], hidden[1])  # block 0's output
    assert torch.equal(outputs["transformer.wte"], model.transformer.wte.weight[inputs["input_ids"]])
    with pytest.raises(ValueError, match="no submodule 'transformer.h.9'"):
        capture(model, ["transformer.h.9"], inputs)


def test_stream_drops_padding_and_special_tokens_and_shuffles():
    model, tokenizer = _gpt2(), _tokenizer()
    texts = _texts(40)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    keep = encoded["attention_mask"].bool() & (encoded["input_ids"] != 2)  # no padding, no BOS
    stream = ActivationStream(model, tokenizer, texts, ["transformer.wte"], batch_tokens=16, texts_per_forward=8,
                              buffer_tokens=64, progress=False)  # fmt: skip
    batches = [batch["transformer.wte"] for batch in stream]
    assert all(batch.shape == (16, 16) for batch in batches)
    rows = torch.cat(batches)
    token_of_row = (rows[:, None, :] == model.transformer.wte.weight[None]).all(-1).float().argmax(1)
    expected = encoded["input_ids"][keep]
    assert int(keep.sum()) - rows.shape[0] < 16  # only the last, partial batch is dropped
    assert 2 not in token_of_row.tolist() and 0 not in token_of_row.tolist()
    assert torch.bincount(token_of_row, minlength=20).le(torch.bincount(expected, minlength=20)).all()
    assert not torch.equal(token_of_row, expected[: rows.shape[0]]), "batches kept the texts' order"


class _TwoLayers(nn.Module):
    """A model whose second hook point is exactly twice the first, token by token."""

    def __init__(self):
        super().__init__()
        self.embed, self.first, self.second = nn.Embedding(20, 4), nn.Identity(), nn.Identity()

    def forward(self, input_ids, attention_mask):
        h = self.first(self.embed(input_ids))
        return self.second(2 * h)


def test_hook_points_stay_aligned_and_the_cache_replays_them(tmp_path):
    model, tokenizer = _TwoLayers(), _tokenizer()
    texts = _texts(30, seed=1)
    kwargs = dict(hookpoints=["first", "second"], batch_tokens=8, texts_per_forward=4, buffer_tokens=32,
                  cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    first_pass = list(ActivationStream(model, tokenizer, texts, **kwargs))
    assert first_pass and all(torch.equal(b["second"], 2 * b["first"]) for b in first_pass)
    assert (tmp_path / "cache" / "complete").is_file()

    class Broken(_TwoLayers):
        def forward(self, input_ids, attention_mask):
            raise AssertionError("the cache should have been read instead")

    replayed = list(ActivationStream(Broken(), tokenizer, texts, **kwargs))
    assert len(replayed) == len(first_pass)
    for a, b in zip(replayed, first_pass):
        assert torch.equal(a["first"], b["first"]) and torch.equal(a["second"], b["second"])


def test_stream_rejects_bad_settings():
    with pytest.raises(ValueError, match="hookpoints is empty"):
        ActivationStream(_TwoLayers(), _tokenizer(), [], [])
    with pytest.raises(ValueError, match="batch_tokens <= buffer_tokens"):
        ActivationStream(_TwoLayers(), _tokenizer(), [], ["first"], batch_tokens=64, buffer_tokens=32)
    # texts longer than the model's 64 positions are cut there, not failed on in its embedding lookup
    stream = ActivationStream(_gpt2(), _tokenizer(), [" ".join(WORDS * 6)], ["transformer.h.0"], batch_tokens=8,
                              buffer_tokens=8, context_size=128, progress=False)  # fmt: skip
    assert stream.context_size == 64 and sum(batch["transformer.h.0"].shape[0] for batch in stream) == 64


def test_hook_points_resolve_in_the_base_model():
    """A model with a head finds its AutoModel's hook point names in its base model, as the train
    command names them (GPT-2's h.0 is GPT2LMHeadModel's transformer.h.0)."""
    model, tokenizer = _gpt2(), _tokenizer()
    inputs = dict(tokenizer(_texts(3), padding=True, return_tensors="pt"))
    short, full = (capture(model, [name], inputs)[name] for name in ("h.0", "transformer.h.0"))
    assert torch.equal(short, full)
    with pytest.raises(ValueError, match="no submodule 'h.9'"):
        capture(model, ["h.9"], inputs)
