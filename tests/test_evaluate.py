"""fastsae.evaluate: an SAE spliced into a tiny randomly initialised GPT-2 (no download). A perfect SAE
costs the model nothing and a zero one is zero ablation; the losses, KL divergence, FVU and L0 agree
with an independent splice written here; `python -m fastsae evaluate` end to end."""

import json

import pytest
import torch
import torch.nn.functional as torch_F

import fastsae
from fastsae.__main__ import main as cli
from fastsae.activations import capture
from fastsae.evaluate import evaluate

from .test_activations import SPECIAL, WORDS, _gpt2, _texts, _tokenizer

pytest.importorskip("transformers")

D = 16  # the tiny GPT-2's width


@pytest.fixture
def model():
    """The tiny GPT-2 with weights large enough that its activations matter: at its initialisation
    (std 0.02) every next-token distribution is about uniform, whatever a hook point holds."""
    model = _gpt2()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _sae(W_enc, W_dec, k, b_dec=None):
    sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=D, n_features=W_enc.shape[1], k=k, centering="none"))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc), sae.W_dec.copy_(W_dec), sae.b_enc.zero_()
        sae.b_dec.copy_(torch.randn(D) if b_dec is None else b_dec)
    return sae


def _perfect_sae():
    """x = relu(x - b) - relu(b - x) + b: 2D features, the positive and negative part of each dimension,
    at most D of them active, so TopK with k = D reconstructs x exactly (up to rounding)."""
    identity = torch.eye(D)
    return _sae(torch.cat([identity, -identity], 1), torch.cat([identity, -identity], 0), D)


def _zero_sae():
    identity = torch.eye(D)
    return _sae(torch.cat([identity, -identity], 1), torch.zeros(2 * D, D), 4, b_dec=torch.zeros(D))


def test_a_perfect_sae_recovers_the_loss_and_a_zero_one_none(model):
    scores = evaluate(model, _tokenizer(), _texts(30), {"h.1": _perfect_sae(), "h.0": _zero_sae()})
    perfect, zero = scores["h.1"], scores["h.0"]
    assert zero.loss_zero - zero.loss_clean > 0.1, "zero ablation should cost this model loss"
    assert perfect.loss_spliced == pytest.approx(perfect.loss_clean, rel=1e-5)
    assert perfect.loss_recovered == pytest.approx(1.0, abs=1e-3) and perfect.kl_div < 1e-6 and perfect.fvu < 1e-9
    assert zero.loss_spliced == zero.loss_zero and zero.loss_recovered == 0.0
    assert zero.kl_div > 0.01 and zero.fvu > 1.0 and zero.l0 == 4


def test_scores_match_an_independent_splice(model):
    """One batch: the losses as torch's cross entropy over the unpadded targets, the KL divergence as
    torch's kl_div, FVU and L0 over the positions that are neither padding nor special tokens."""
    tokenizer, texts = _tokenizer(), _texts(12, seed=3)
    sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=D, n_features=64, k=6, centering="none"))
    scores = evaluate(model, tokenizer, texts, {"h.1": sae}, texts_per_forward=len(texts))["h.1"]
    inputs = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    positions = inputs["attention_mask"].bool() & (inputs["input_ids"] != SPECIAL.index("[BOS]"))
    x = capture(model, ["transformer.h.1"], inputs)["transformer.h.1"][positions]

    def splice(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[positions] = sae.eval()(hidden[positions]).recon
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        clean_logits = model(**inputs).logits[:, :-1]
        handle = model.transformer.h[1].register_forward_hook(splice)
        spliced_logits = model(**inputs).logits[:, :-1]
        handle.remove()
    labels = inputs["input_ids"][:, 1:].masked_fill(~inputs["attention_mask"][:, 1:].bool(), -100)
    for logits, expected in ((clean_logits, scores.loss_clean), (spliced_logits, scores.loss_spliced)):
        loss = torch_F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        assert float(loss) == pytest.approx(expected, rel=1e-5)
    real = labels != -100
    kl = torch_F.kl_div(spliced_logits.log_softmax(-1)[real], clean_logits.log_softmax(-1)[real], log_target=True,
                        reduction="batchmean")  # fmt: skip
    assert float(kl) == pytest.approx(scores.kl_div, rel=1e-4)
    with torch.no_grad():
        out = sae(x)
    assert scores.n_tokens == x.shape[0] and scores.n_predictions == int(real.sum())
    assert scores.fvu == pytest.approx(float((x - out.recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-5)
    assert scores.l0 == pytest.approx(float((out.vals != 0).sum(-1).float().mean()), rel=1e-6)
    fired = torch.bincount(out.idx[out.vals > 0], minlength=64)
    assert scores.alive == float((fired > 0).float().mean()) and 0 < scores.alive < 1


def test_special_tokens_keep_their_activations_unless_asked(model):
    tokenizer, texts = _tokenizer(), _texts(10, seed=5)
    mask = tokenizer(texts, padding=True, return_tensors="pt")["attention_mask"]
    for keep, expected in ((False, int(mask.sum()) - len(texts)), (True, int(mask.sum()))):  # one [BOS] per text
        scores = evaluate(model, tokenizer, texts, {"h.2": _zero_sae()}, keep_special_tokens=keep)
        assert scores["h.2"].n_tokens == expected


def test_evaluation_leaves_the_sae_and_the_model_as_they_were(model):
    """Both run in evaluation mode (the model's dropout off: the same scores as from a model in
    evaluation mode) and return to training mode; the SAE's statistics are untouched."""
    sae = _perfect_sae().train()
    sae.tokens_since_fired.fill_(7)
    state = {name: t.clone() for name, t in sae.state_dict().items()}
    in_eval_mode = evaluate(model.eval(), _tokenizer(), _texts(8), {"h.0": sae})
    assert evaluate(model.train(), _tokenizer(), _texts(8), {"h.0": sae}) == in_eval_mode
    assert model.training and sae.training
    assert all(torch.equal(t, state[name]) for name, t in sae.state_dict().items())


def test_left_padding_scores_no_prediction_from_padding(model):
    right, left = _tokenizer(), _tokenizer()
    left.padding_side = "left"
    texts = _texts(10, seed=4)
    scores = [evaluate(model, tokenizer, texts, {"h.0": _zero_sae()})["h.0"] for tokenizer in (right, left)]
    assert scores[0].n_predictions == scores[1].n_predictions and scores[0].n_tokens == scores[1].n_tokens


def test_max_predictions_stops_after_the_batch_that_reaches_it(model):
    texts = _texts(40, seed=2)
    every = evaluate(model, _tokenizer(), texts, {"h.0": _zero_sae()}, texts_per_forward=4)["h.0"]
    some = evaluate(model, _tokenizer(), texts, {"h.0": _zero_sae()}, texts_per_forward=4, max_predictions=20)["h.0"]
    assert 20 <= some.n_predictions < every.n_predictions


def test_evaluate_explains_bad_input(model):
    tokenizer = _tokenizer()
    wide = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=D + 1, n_features=64, k=4))
    long_text = " ".join(WORDS * 6)  # 90 tokens: more than the model's 64 positions
    for saes, texts, context_size, message in [
        ({}, _texts(2), 32, "saes is empty"),
        ({"h.7": _zero_sae()}, _texts(2), 32, "no submodule 'h.7'"),
        ({"h.0": wide}, _texts(2), 32, "h.0: its output has 16 dimensions, the SAE for it d_in=17"),
        ({"h.0": _zero_sae()}, [], 32, "no next-token prediction"),
        ({"h.0": _zero_sae()}, ["[BOS]", "[BOS]"], 32, "no next-token prediction"),
        ({"h.0": _zero_sae()}, ["[BOS] the", "[BOS] cat"], 32, None),  # (fine: one spliced token each)
        ({"h.0": _zero_sae()}, [long_text], 100, None),  # (fine: truncated to the model's 64 positions)
    ]:
        if message is None:
            evaluate(model, tokenizer, texts, saes, context_size=context_size)
            continue
        with pytest.raises(ValueError, match=message):
            evaluate(model, tokenizer, texts, saes, context_size=context_size)


class _FlatModel(torch.nn.Module):
    """A causal LM whose `flat` submodule sees the tokens as one [batch x seq, d] matrix."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(len(SPECIAL) + len(WORDS), D)
        self.flat = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, len(SPECIAL) + len(WORDS))

    def forward(self, input_ids, attention_mask):
        hidden = self.flat(self.embed(input_ids).flatten(0, 1))
        return self.head(hidden).unflatten(0, input_ids.shape)


def test_a_hook_point_must_keep_the_tokens_shape():
    with pytest.raises(ValueError, match=r"flat returns \(\d+, 16\), not \[batch, seq, d\]"):
        evaluate(_FlatModel(), _tokenizer(), _texts(4), {"flat": _zero_sae()})


@pytest.mark.gpu
def test_evaluate_on_cuda_in_bf16(model):
    """A bf16 model and SAE on the GPU, the SAE's kernels included: the perfect SAE still costs the model
    (almost) nothing, against the same evaluation on the CPU in fp32."""
    texts, tokenizer = _texts(30), _tokenizer()
    on_cpu = evaluate(model, tokenizer, texts, {"h.1": _perfect_sae()})["h.1"]
    sae = _perfect_sae().to("cuda", torch.bfloat16)
    on_gpu = evaluate(model.to("cuda", torch.bfloat16), tokenizer, texts, {"h.1": sae})["h.1"]
    assert on_gpu.n_tokens == on_cpu.n_tokens and on_gpu.l0 <= D
    assert on_gpu.loss_clean == pytest.approx(on_cpu.loss_clean, rel=2e-2)
    assert on_gpu.loss_recovered == pytest.approx(1.0, abs=5e-2) and on_gpu.fvu < 1e-3


def test_evaluate_command(tmp_path, model, capsys, hub_repository):
    model_dir = tmp_path / "tiny-gpt2"
    model.save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    texts = tmp_path / "held_out.txt"
    texts.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(6)) + "\n")
    _perfect_sae().save(tmp_path / "h.1.safetensors")
    _zero_sae().save(tmp_path / "zero.safetensors")
    args = ["evaluate", "--model", str(model_dir), "--texts", str(texts), "--device", "cpu"]
    saes = ["--sae", str(tmp_path / "h.1.safetensors"), str(tmp_path / "zero.safetensors")]
    assert cli([*args, *saes, "--hookpoint", "h.1", "h.0", "--json", str(tmp_path / "scores.json")]) == 0
    assert "| h.1 | 1 |" in capsys.readouterr().out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores.keys() == {"h.1", "h.0"} and scores["h.0"]["loss_recovered"] == 0.0
    assert cli([*args, *saes]) == 2  # the second is named "zero": no such hook point
    assert "no submodule 'zero'" in capsys.readouterr().err
    assert cli([*args, *saes, "--hookpoint", "h.1"]) == 2
    assert "names 1 hook points for 2 SAEs" in capsys.readouterr().err
    _perfect_sae().save(hub_repository.path / "h.1", format="sparsify")  # a Hub repository's h.1
    assert cli([*args, "--sae", "hf://org/saes/h.1"]) == 0
    assert "| h.1 | 1 |" in capsys.readouterr().out
    assert cli([*args, "--sae", "hf://org"]) == 2
    assert "a Hub SAE is hf://ORG/REPO" in capsys.readouterr().err
