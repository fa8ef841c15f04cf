"""fastsae.features: each feature's top-activating examples, against a brute-force search over every
token's codes at once, their contexts within their own texts, and `python -m fastsae features` end to
end on a tiny GPT-2 built from a config (no download)."""

import json
import os

import matplotlib.image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsae
import fastsae.features
from fastsae.__main__ import main as cli
from fastsae.activations import capture
from fastsae.features import _TopTable, top_examples

from .test_activations import SPECIAL, _gpt2, _texts, _tokenizer

pytest.importorskip("transformers")

N_EXAMPLES = 3
BEFORE, AFTER = 4, 2


def _saes():
    """A TopK SAE (sparse codes) at h.0 and a ReLU SAE (dense codes) at h.1, random, on GPT-2's d = 16."""
    torch.manual_seed(1)
    topk = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=16, n_features=32, k=4, dtype="float32"))
    relu = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=16, n_features=24, activation="relu", dtype="float32"))
    with torch.no_grad():
        relu.b_enc.fill_(-0.05)  # sparser: most codes 0
    return {"h.0": topk, "h.1": relu}


def _brute_force(model, tokenizer, texts, saes):
    """{hook point: (values [F, M], positions [F, M], windows [F, M, BEFORE + 1 + AFTER], fire counts
    [F])} from every token's dense codes at once (one text a forward, no padding; 0 on special tokens),
    and the texts' token ids one after the other."""
    ids, codes, positions = [], {name: [] for name in saes}, []
    for sae in saes.values():
        sae.eval()
    for text in texts:
        inputs = dict(tokenizer([text], return_tensors="pt"))
        outputs = capture(model, list(saes), inputs)
        text_ids = inputs["input_ids"][0]
        encoded = ~torch.isin(text_ids, torch.tensor(tokenizer.all_special_ids))
        positions.append(sum(len(t) for t in ids) + torch.nonzero(encoded).flatten())
        ids.append(text_ids)
        for name, sae in saes.items():
            with torch.no_grad():
                z = sae.encode(outputs[name][0][encoded])
            if isinstance(z, fastsae.functional.TopKCodes):
                z = torch.zeros(z.vals.shape[0], sae.cfg.n_features).scatter(1, z.idx.long(), z.vals)
            codes[name].append(z)
    positions, lengths = torch.cat(positions), [len(t) for t in ids]
    text_of = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor(lengths))
    expected = {}
    for name, parts in codes.items():
        z = torch.cat(parts)  # [encoded tokens, F]
        every = torch.zeros(sum(lengths), z.shape[1])  # [tokens, F]
        every[positions] = z
        values = torch.zeros(z.shape[1], N_EXAMPLES)
        where = torch.full((z.shape[1], N_EXAMPLES), -1)
        windows = torch.zeros(z.shape[1], N_EXAMPLES, BEFORE + 1 + AFTER)
        for feature in range(z.shape[1]):
            fired = torch.nonzero(z[:, feature] > 0).flatten()
            # largest first, the earlier token first among equals
            order = sorted(fired.tolist(), key=lambda row, f=feature: (-float(z[row, f]), row))[:N_EXAMPLES]
            values[feature, : len(order)] = z[order, feature]
            where[feature, : len(order)] = positions[order]
            for m, p in enumerate(positions[order].tolist()):
                for i, q in enumerate(range(p - BEFORE, p + AFTER + 1)):
                    if 0 <= q < len(text_of) and text_of[q] == text_of[p]:
                        windows[feature, m, i] = every[q, feature]
        expected[name] = (values, where, windows, (z > 0).sum(0))
    return expected, torch.cat(ids)


def test_top_examples_match_a_brute_force_search():
    """Texts in batches of 3 (padded, BOS dropped), a TopK and a ReLU SAE: each feature's largest codes,
    their tokens and its fire count as a search over all the tokens' codes at once finds them; each
    example's context lies within its own text, its token marked."""
    model, tokenizer, texts, saes = _gpt2(), _tokenizer(), _texts(20), _saes()
    found = top_examples(
        model, tokenizer, texts, saes, n_examples=N_EXAMPLES, texts_per_forward=3, before=BEFORE, after=AFTER
    )
    expected, all_ids = _brute_force(model, tokenizer, texts, saes)
    for name, (values, positions, windows, fire_counts) in expected.items():
        examples = found[name]
        assert torch.equal(examples.token_ids, all_ids)
        assert examples.n_tokens == int(sum(~torch.isin(all_ids, torch.tensor(tokenizer.all_special_ids))))
        assert torch.equal(examples.fire_counts, fire_counts), name
        assert torch.equal(examples.positions, positions), name
        torch.testing.assert_close(examples.values, values, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(examples.windows, windows, rtol=1e-5, atol=1e-6, msg=name)
        around = (windows > 0).sum() - (values > 0).sum()  # codes on the tokens around the examples' own
        assert around >= 3, f"{name}: too few codes around the examples to test them"
        assert (positions[:, 0] >= 0).sum() >= 5, f"{name}: too few features fired to test anything"
        starts = examples.text_starts.tolist()
        for feature in range(values.shape[0]):
            contexts = examples.contexts(feature)
            assert len(contexts) == int((positions[feature] >= 0).sum())
            for m, (value, ids, at, codes) in enumerate(contexts):
                position = int(positions[feature, m])
                text = max(i for i, start in enumerate(starts[:-1]) if start <= position)
                start, end = max(starts[text], position - BEFORE), min(starts[text + 1], position + AFTER + 1)
                assert ids == all_ids[start:end].tolist() and ids[at] == all_ids[position]
                assert value == pytest.approx(float(values[feature, m]), rel=1e-5, abs=1e-6)
                window = windows[feature, m, start - position + BEFORE : end - position + BEFORE]
                assert codes == pytest.approx(window.tolist(), rel=1e-5, abs=1e-6) and codes[at] == value


def test_top_examples_stop_after_max_tokens_and_refuse_nothing_to_do():
    model, tokenizer, texts, saes = _gpt2(), _tokenizer(), _texts(20), _saes()
    every = top_examples(model, tokenizer, texts, saes, texts_per_forward=2)["h.0"].n_tokens
    some = top_examples(model, tokenizer, texts, saes, texts_per_forward=2, max_tokens=10)["h.0"]
    assert 10 <= some.n_tokens < every and some.text_starts.shape[0] < 21
    with pytest.raises(ValueError, match="saes is empty"):
        top_examples(model, tokenizer, texts, {})
    with pytest.raises(ValueError, match="no position to encode"):
        top_examples(model, tokenizer, ["[BOS]"], saes)
    with pytest.raises(ValueError, match="feature 32 is out of range"):
        some.contexts(32)
    with pytest.raises(ValueError, match="before, after >= 0"):
        top_examples(model, tokenizer, texts, saes, before=-1)


def test_features_command_writes_json_and_html(tmp_path, capsys, monkeypatch):
    """`python -m fastsae features`: per SAE a JSON file (every feature that fired, or those asked for;
    each example's tokens as the tokenizer decodes them, its own token marked), an HTML page, and the
    fire rates' histogram the page shows."""
    model_dir = tmp_path / "tiny-gpt2"
    _gpt2().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(_texts(30)))
    saes = _saes()
    for name, sae in saes.items():
        sae.save(tmp_path / f"{name}.safetensors")
    out = tmp_path / "features"
    common = ["features", "--model", str(model_dir), "--texts", str(texts), "--out", str(out), "--examples", "2",
              "--device", "cpu"]  # fmt: skip
    assert cli([*common, "--sae", str(tmp_path / "h.0.safetensors"), str(tmp_path / "h.1.safetensors")]) == 0
    assert "h.0: " in capsys.readouterr().out
    tokenizer = _tokenizer()
    for name in saes:
        summary = json.loads((out / f"{name}.json").read_text())
        assert summary["hookpoint"] == name and summary["n_features"] == saes[name].cfg.n_features
        assert len(summary["features"]) == summary["fired"] > 0
        for record in summary["features"]:
            assert 0 < record["fire_rate"] <= 1 and 1 <= len(record["examples"]) <= 2
            for example in record["examples"]:
                assert example["tokens"][example["token"]].strip() not in SPECIAL  # (BOS is never encoded)
                assert len(example["codes"]) == len(example["tokens"])
                assert example["codes"][example["token"]] == example["value"] > 0
                assert all(token == tokenizer.decode(tokenizer.convert_tokens_to_ids([token.strip()]))
                           for token in example["tokens"])  # fmt: skip
        page = (out / f"{name}.html").read_text()
        assert page.count("<section") == summary["fired"] and "outline: 1px solid" in page
        assert f'<img src="{name}_density.png"' in page
        assert matplotlib.image.imread(out / f"{name}_density.png").shape[2] in (3, 4)
    assert "first" not in page  # (every feature shown)
    assert cli([*common, "--sae", str(tmp_path / "h.0.safetensors"), "--features", "5", "7", "9"]) == 0
    assert [record["feature"] for record in json.loads((out / "h.0.json").read_text())["features"]] == [5, 7, 9]
    monkeypatch.setattr(fastsae.features, "HTML_FEATURES", 2)  # a page of the first two, the JSON of all three
    assert cli([*common, "--sae", str(tmp_path / "h.0.safetensors"), "--features", "5", "7", "9"]) == 0
    page = (out / "h.0.html").read_text()
    assert 'id="f7"' in page and 'id="f9"' not in page and "shows the first 2 of the 3 features written" in page
    assert len(json.loads((out / "h.0.json").read_text())["features"]) == 3
    assert cli([*common, "--sae", str(tmp_path / "h.0.safetensors"), "--features", "32"]) == 2
    assert "feature 32 is out of range: the SAE has 32 features" in capsys.readouterr().err


@pytest.mark.gpu
def test_top_examples_on_a_gpu_match_the_cpu():
    """The model and the SAEs on CUDA (the TopK SAE's Triton encode, the table merged on the GPU): the
    same examples as on CPU, to fp32 rounding (a ReLU code within rounding of 0 may fire on one only;
    the tokens are compared where the codes are clear of it)."""
    model, tokenizer, texts, saes = _gpt2(), _tokenizer(), _texts(40), _saes()
    on_cpu = top_examples(model, tokenizer, texts, saes, n_examples=N_EXAMPLES, texts_per_forward=4)
    on_gpu = top_examples(model.cuda(), tokenizer, texts, {name: sae.cuda() for name, sae in saes.items()},
                          n_examples=N_EXAMPLES, texts_per_forward=4)  # fmt: skip
    for name, want in on_cpu.items():
        got = on_gpu[name]
        assert (got.fire_counts - want.fire_counts).abs().max() <= 1, name
        torch.testing.assert_close(got.values, want.values, rtol=1e-4, atol=1e-5, msg=name)
        clear = want.values > 1e-3
        assert torch.equal(got.positions[clear], want.positions[clear]), name


@settings(max_examples=int(os.environ.get("FASTSAE_PROPERTY_EXAMPLES", "10")) * 5, deadline=None)
@given(
    n_features=st.integers(1, 6), n_examples=st.integers(1, 4), levels=st.integers(1, 4),
    batches=st.lists(st.integers(0, 12), min_size=1, max_size=5), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_the_running_table_keeps_what_one_sort_of_every_code_keeps(n_features, n_examples, levels, batches, seed):
    """The running table over batches of codes (few distinct values: ties everywhere, and zeros, which
    never fire) keeps each feature's n_examples largest codes, of equal ones the earliest token's, and
    counts the fires: as one sort of every code at once does."""
    generator = torch.Generator().manual_seed(seed)
    table = _TopTable(n_features, n_examples, 1, torch.device("cpu"))
    every, position = [], 0
    for size in batches:
        features = torch.randint(0, n_features, (size,), generator=generator)
        values = torch.randint(0, levels + 1, (size,), generator=generator).float()  # 0: does not fire
        positions = torch.arange(position, position + size)  # in token order, after the table's
        position += size
        table.add(features, values, positions, lambda f, p: p[:, None].float())  # window: the position
        every += list(zip(features.tolist(), values.tolist(), positions.tolist()))
    for feature in range(n_features):
        fired = sorted(((-v, p) for f, v, p in every if f == feature and v > 0))[:n_examples]
        assert int(table.fire_counts[feature]) == sum(1 for f, v, _ in every if f == feature and v > 0)
        kept = [(float(-v), p) for v, p in fired] + [(0.0, -1)] * (n_examples - len(fired))
        assert list(zip(table.values[feature].tolist(), table.positions[feature].tolist())) == kept
        assert table.windows[feature, : len(fired), 0].tolist() == [float(p) for _, p in fired]
