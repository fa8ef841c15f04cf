r"""Each feature's top-activating examples in its model's texts: the first thing one reads to interpret a
feature, and to check that an SAE's features are about something.

    examples = top_examples(model, tokenizer, texts, {"h.6": sae}, n_examples=10)
    examples["h.6"].contexts(123)    # feature 123's examples: (code, token ids, which token, codes on them)
    write_examples(examples["h.6"], tokenizer, "features")   # features/h.6.json and features/h.6.html

The model runs on the texts in batches, as `ActivationStream` runs it (padding dropped and, unless
`keep_special_tokens`, the tokenizer's special tokens such as BOS: the positions an SAE trains on), but in
order, with each position's token remembered. Every SAE encodes its hook point's activations, and each
feature keeps its `n_examples` largest codes so far, with the tokens they were on (of equal codes, the
earlier token's) and its codes on the `before` tokens before and `after` after (read from the same batch
of codes, so the window is fixed before the scan), so memory stays [features, n_examples, window]
whatever the texts' length; the texts' token ids are kept (8 bytes a token) to show each example in its
context. Each feature's fire count over the texts comes with them.

    python -m fastsae features --model gpt2 --sae gpt2_h6/h.6.safetensors --texts held_out.txt --out features

writes, per SAE, a JSON file (each feature's fire rate and examples: its code, the tokens around it as
the tokenizer decodes them one by one, which of them it is on, and the feature's codes on each) and an
HTML page that shows them (the first HTML_FEATURES), each token shaded by the feature's code on it,
under a histogram of every feature's fire rate (`<hook point>_density.png`). `--features 12 345` keeps
the files to those features (by default: every feature that fired).
"""

from __future__ import annotations

import argparse
import html
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import functional as F
from .activations import _batched, _special_token_ids, capture, encode_texts, load_model, usable_context
from .cli import add_sae_and_text_arguments, at_least, load_saes, read_texts
from .evaluate import evaluation_mode, sae_input
from .sae import SparseAutoencoder, write_atomically


@dataclass
class FeatureExamples:
    """One SAE's features over the texts scanned: `values` [F, M] each feature's largest codes in
    descending order (0 after its last example) and `positions` [F, M] the tokens they were on (indices
    into `token_ids`; -1 after the last example); `windows` [F, M, before + 1 + after] the feature's
    codes on the tokens around each example's, its own in the middle (0 beyond its text and on tokens
    not encoded); `fire_counts` [F] the tokens each fired on, of `n_tokens` encoded. `token_ids` [T]
    holds every real token of the texts scanned, text after text, and `text_starts` [texts + 1] where
    each text's tokens begin (and the end of the last)."""

    hookpoint: str
    n_tokens: int
    fire_counts: Tensor
    values: Tensor
    positions: Tensor
    windows: Tensor
    before: int
    token_ids: Tensor
    text_starts: Tensor

    def contexts(self, feature: int) -> list[tuple[float, list[int], int, list[float]]]:
        """Feature `feature`'s examples, largest first: (its code, the token ids of its window within
        its text, the index of its token among those, and the feature's codes on them)."""
        if not 0 <= feature < self.values.shape[0]:
            raise ValueError(f"feature {feature} is out of range: the SAE has {self.values.shape[0]} features")
        after = self.windows.shape[2] - 1 - self.before
        examples = []
        for value, position, window in zip(
            self.values[feature].tolist(), self.positions[feature].tolist(), self.windows[feature].tolist()
        ):
            if position < 0:
                break
            text = int(torch.searchsorted(self.text_starts, position, right=True)) - 1
            start = max(int(self.text_starts[text]), position - self.before)
            end = min(int(self.text_starts[text + 1]), position + after + 1)
            codes = window[start - (position - self.before) : end - (position - self.before)]
            examples.append((value, self.token_ids[start:end].tolist(), position - start, codes))
        return examples


class _TopTable:
    """A running [F, M] table of each feature's largest codes, the tokens they were on, and the
    feature's codes around those tokens."""

    def __init__(self, n_features: int, n_examples: int, window: int, device: torch.device):
        self.values = torch.zeros(n_features, n_examples, dtype=torch.float32, device=device)
        self.positions = torch.full((n_features, n_examples), -1, dtype=torch.int64, device=device)
        self.windows = torch.zeros(n_features, n_examples, window, dtype=torch.float32, device=device)
        self.fire_counts = torch.zeros(n_features, dtype=torch.int64, device=device)

    def add(
        self, features: Tensor, values: Tensor, positions: Tensor, windows: Callable[[Tensor, Tensor], Tensor]
    ) -> None:
        """Merges a batch's codes (feature, value, token position; 1-D each, in token order, after the
        table's tokens) into the table: each feature keeps its M largest, the table's own first among
        equal values (they came earlier). `windows(features, positions)` gives the new examples' windows."""
        fired = values > 0
        features, values, positions = features[fired], values[fired].float(), positions[fired]
        n_features, n_examples = self.values.shape
        self.fire_counts += torch.bincount(features, minlength=n_features)
        kept = self.positions >= 0
        rows = torch.arange(n_features, device=features.device)[:, None].expand_as(kept)
        old_windows = self.windows[kept]
        source = torch.cat([torch.arange(old_windows.shape[0], device=features.device), torch.full_like(features, -1)])
        features = torch.cat([rows[kept], features])
        values = torch.cat([self.values[kept], values])
        positions = torch.cat([self.positions[kept], positions])
        # descending values within each feature, stable, so that equal values keep their order
        order = torch.argsort(values, descending=True, stable=True)
        order = order[torch.argsort(features[order], stable=True)]
        features, values, positions, source = features[order], values[order], positions[order], source[order]
        counts = torch.bincount(features, minlength=n_features)
        rank = torch.arange(features.shape[0], device=features.device) - (torch.cumsum(counts, 0) - counts)[features]
        top = rank < n_examples
        features, values, positions, source, rank = (t[top] for t in (features, values, positions, source, rank))
        new = source < 0
        self.values.zero_()
        self.positions.fill_(-1)
        self.windows.zero_()
        self.values[features, rank] = values
        self.positions[features, rank] = positions
        self.windows[features[~new], rank[~new]] = old_windows[source[~new]]
        self.windows[features[new], rank[new]] = windows(features[new], positions[new])


def top_examples(
    model: nn.Module,
    tokenizer,
    texts: Iterable[str],
    saes: dict[str, SparseAutoencoder],
    n_examples: int = 10,
    context_size: int = 128,
    texts_per_forward: int = 8,
    max_tokens: int | None = None,
    keep_special_tokens: bool = False,
    before: int = 10,
    after: int = 3,
    progress: bool = True,
) -> dict[str, FeatureExamples]:
    """{hook point: FeatureExamples} of `saes` over `texts` run through `model` (see the module
    docstring), tokenized by `tokenizer` (a Hugging Face tokenizer) in batches of `texts_per_forward`
    cut at `context_size` tokens (or the model's maximum positions, where fewer), until `max_tokens`
    positions have been encoded (None: every text), with each example's window of `before` tokens
    before its token and `after` after it (a progress bar of the model's forward passes with `progress`).
    The SAEs and the model run in evaluation mode and are left in the mode they were in."""
    if not saes:
        raise ValueError("saes is empty: give {hook point: SAE}")
    if n_examples < 1 or context_size < 1 or texts_per_forward < 1 or before < 0 or after < 0:
        raise ValueError(
            f"need n_examples, context_size and texts_per_forward >= 1 and before, after >= 0, got {n_examples}, "
            f"{context_size}, {texts_per_forward}, {before}, {after}"
        )
    context_size = usable_context(model, context_size)
    special = [] if keep_special_tokens else _special_token_ids(tokenizer)
    model_device = next(model.parameters()).device
    tables = {
        name: _TopTable(sae.cfg.n_features, n_examples, before + 1 + after, next(sae.parameters()).device)
        for name, sae in saes.items()
    }
    token_ids: list[Tensor] = []
    text_starts = [torch.zeros(1, dtype=torch.int64)]
    n_seen, n_tokens = 0, 0  # real tokens kept, positions encoded
    batches = tqdm(_batched(texts, texts_per_forward), desc="features", unit=" forward", disable=not progress)
    with evaluation_mode(model, *saes.values()), torch.no_grad():
        for batch in batches:
            inputs, encoded = encode_texts(tokenizer, batch, context_size, special)
            real = inputs["attention_mask"].bool()
            # each real token's index in the kept ids: text after text, in order within a text
            index = torch.cumsum(real.flatten(), 0).view(real.shape) - 1 + n_seen
            token_ids.append(inputs["input_ids"][real])
            text_starts.append(n_seen + torch.cumsum(real.sum(1), 0))
            window = _Window(n_seen, real, index[encoded], before, after)
            n_seen += int(real.sum())
            outputs = capture(model, list(saes), {key: t.to(model_device) for key, t in inputs.items()})
            for name, sae in saes.items():
                x = outputs[name][encoded.to(outputs[name].device)]
                _add_codes(tables[name], sae, sae_input(name, sae, x), window)
            n_tokens += int(encoded.sum())
            if max_tokens is not None and n_tokens >= max_tokens:
                break
    if n_tokens == 0:
        raise ValueError("the texts gave no position to encode (every token was padding or a special token)")
    ids, starts = torch.cat(token_ids), torch.cat(text_starts)
    found = {}
    for name, table in tables.items():
        found[name] = FeatureExamples(
            hookpoint=name, n_tokens=n_tokens, fire_counts=table.fire_counts.cpu(), values=table.values.cpu(),
            positions=table.positions.cpu(), windows=table.windows.cpu(), before=before, token_ids=ids,
            text_starts=starts,
        )  # fmt: skip
    return found


class _Window:
    """Where a batch's tokens sit, to read a feature's codes around an example: the batch's real tokens
    are positions `first` .. of the kept ids; `positions` [n] those of the encoded ones, in the order of
    the activations the SAEs encode."""

    def __init__(self, first: int, real: Tensor, positions: Tensor, before: int, after: int):
        self.first, self.positions = first, positions
        self.offsets = torch.arange(-before, after + 1)
        self.text = torch.repeat_interleave(torch.arange(real.shape[0]), real.sum(1))  # of each real token
        self.row = torch.full((self.text.shape[0],), -1, dtype=torch.int64)  # of each real token's codes
        self.row[positions - first] = torch.arange(positions.shape[0])

    def codes(self, code: Callable[[Tensor, Tensor], Tensor], features: Tensor, positions: Tensor) -> Tensor:
        """[m, window] codes of `features` [m] around `positions` [m] (this batch's): `code(rows,
        features)` gives the codes of encoded rows, 0 elsewhere (beyond the example's text, or a token not
        encoded)."""
        device = features.device
        local = positions[:, None] - self.first + self.offsets.to(device)
        inside = (local >= 0) & (local < self.text.shape[0])
        local = local.clamp(0, self.text.shape[0] - 1)
        text, row = self.text.to(device), self.row.to(device)
        rows = row[local]
        valid = inside & (text[local] == text[positions - self.first][:, None]) & (rows >= 0)
        values = code(rows.clamp(min=0), features[:, None].expand_as(rows))
        return torch.where(valid, values.float(), 0.0)


# Examples whose windows are read at once: TopK's lookup compares [examples, window, k] indices
WINDOW_CHUNK = 4096


def _add_codes(table: _TopTable, sae: SparseAutoencoder, x: Tensor, window: _Window) -> None:
    """The codes of x [n, d] (the hook point's activations at the batch's encoded tokens, `sae_input`'s)
    into the table."""
    if x.shape[0] == 0:  # a batch of padding and special tokens only
        return
    codes = sae.encode(x)
    positions = window.positions.to(x.device)
    if isinstance(codes, F.TopKCodes):
        idx, vals = codes.idx.long(), codes.vals

        def code(rows: Tensor, features: Tensor) -> Tensor:
            return (vals[rows] * (idx[rows] == features[..., None])).sum(-1)

        features, values, positions = idx.flatten(), vals.flatten(), positions.repeat_interleave(idx.shape[1])
    else:

        def code(rows: Tensor, features: Tensor) -> Tensor:
            return codes[rows, features]

        rows, features = codes.nonzero(as_tuple=True)
        values, positions = codes[rows, features], positions[rows]

    def windows(features: Tensor, positions: Tensor) -> Tensor:
        parts = [
            window.codes(code, features[start : start + WINDOW_CHUNK], positions[start : start + WINDOW_CHUNK])
            for start in range(0, features.shape[0], WINDOW_CHUNK)
        ]
        return torch.cat(parts) if parts else table.windows.new_zeros(0, table.windows.shape[2])

    table.add(features, values, positions, windows)


def write_examples(
    examples: FeatureExamples, tokenizer, directory: str | Path, features: Sequence[int] | None = None
) -> tuple[Path, Path, Path]:  # fmt: skip
    """Writes `directory`/<hook point>.json and .html (see the module docstring) for `features` (None:
    every feature that fired), and <hook point>_density.png, the histogram of every feature's fire rate
    (log10; the features that never fired counted apart), which the page shows; returns their paths.
    Each file is written whole or not at all."""
    n_features = examples.values.shape[0]
    if features is None:
        features = torch.nonzero(examples.fire_counts).flatten().tolist()
    for feature in features:
        if not 0 <= feature < n_features:
            raise ValueError(f"feature {feature} is out of range: the SAE has {n_features} features")
    pieces: dict[int, str] = {}

    def piece(token_id: int) -> str:  # a token as the tokenizer decodes it alone
        if token_id not in pieces:
            pieces[token_id] = tokenizer.decode([token_id])
        return pieces[token_id]

    records = []
    for feature in features:
        records.append({
            "feature": feature,
            "fire_rate": int(examples.fire_counts[feature]) / examples.n_tokens,
            "examples": [
                {"value": value, "tokens": [piece(t) for t in ids], "token": at, "codes": codes}
                for value, ids, at, codes in examples.contexts(feature)
            ],
        })  # fmt: skip
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = examples.hookpoint.replace("/", "_")
    summary = {"hookpoint": examples.hookpoint, "n_tokens": examples.n_tokens, "n_features": n_features,
               "fired": int((examples.fire_counts > 0).sum()), "features": records}  # fmt: skip
    json_path, html_path = directory / f"{stem}.json", directory / f"{stem}.html"
    density_path = directory / f"{stem}_density.png"
    _plot_density(examples, density_path)
    write_atomically(json_path, lambda tmp: Path(tmp).write_text(json.dumps(summary), encoding="utf-8"))
    write_atomically(html_path, lambda tmp: Path(tmp).write_text(_html(summary, density_path.name), encoding="utf-8"))
    return json_path, html_path, density_path


def _plot_density(examples: FeatureExamples, path: Path) -> None:
    """The histogram of the features' log10 fire rates over the texts scanned (the usual first look at
    an SAE's features: dead ones pile up at the left, dense ones at the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fired = examples.fire_counts[examples.fire_counts > 0].double()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if fired.numel():
        axis.hist(torch.log10(fired / examples.n_tokens).numpy(), bins=50)
    never = examples.fire_counts.shape[0] - fired.numel()
    axis.set(xlabel="log10 fire rate", ylabel="features",
             title=f"{examples.hookpoint}: {never} of {examples.fire_counts.shape[0]} features never fired "
                   f"on {examples.n_tokens} tokens")  # fmt: skip
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


# Features the HTML page shows at most (the first of those written; the JSON file holds them all): a page
# of every feature of a wide SAE (hundreds of MB) is more than a browser opens.
HTML_FEATURES = 2000


def _html(summary: dict, density_png: str) -> str:
    """A static page of the features' examples, under the fire rates' histogram (the file
    `density_png` beside it; no script, nothing fetched from elsewhere)."""
    sections = []
    shown = summary["features"][:HTML_FEATURES]
    for record in shown:
        largest = max((example["value"] for example in record["examples"]), default=0.0) or 1.0
        rows = []
        for example in record["examples"]:
            tokens = []
            for i, (token, code) in enumerate(zip(example["tokens"], example["codes"])):
                text = html.escape(token.replace("\n", "\u23ce"))
                style = f"background: rgba(255, 140, 0, {code / largest:.2f})" if code > 0 else ""
                if i == example["token"]:
                    style += "; outline: 1px solid #c60"
                tokens.append(f'<span style="{style}" title="{code:.3g}">{text}</span>' if style else text)
            value = f'<span class="value">{example["value"]:.3g}</span>'
            rows.append(f'<li>{value} <span class="text">{"".join(tokens)}</span></li>')
        feature, rate = record["feature"], 100 * record["fire_rate"]
        sections.append(
            f'<section id="f{feature}"><h2>feature {feature}</h2><p>fires on {rate:.3g}% of tokens</p>'
            f"<ol>{''.join(rows)}</ol></section>"
        )
    title = html.escape(f"{summary['hookpoint']}: top-activating examples")
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>'
        "body { font-family: sans-serif; max-width: 70em; margin: auto; } .text { white-space: pre-wrap; "
        "font-family: monospace; } .value { display: inline-block; width: 4em; color: #666; }"
        f"</style></head><body><h1>{title}</h1><p>{summary['fired']} of {summary['n_features']} features fired on "
        f"{summary['n_tokens']} tokens; each token shaded by the feature's code on it, the example's outlined.</p>"
        f'<img src="{html.escape(density_png)}" alt="fire rates">'
        f"{_html_cut(len(shown), len(summary['features']))}{''.join(sections)}</body></html>"
    )


def _html_cut(shown: int, written: int) -> str:
    """The page's note on the features it leaves to the JSON file, if any."""
    if shown == written:
        return ""
    return (
        f"<p>This page shows the first {shown} of the {written} features written; the JSON file holds them all "
        "(<code>--features</code> picks the ones to show).</p>"
    )


# ---------------------------------------------------------------------------------------------------
# Command line: python -m fastsae features


def add_parser(commands) -> None:
    features_cmd = commands.add_parser(
        "features", help="each feature's top-activating examples in a model's texts", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    features_cmd.add_argument("--model", required=True, help="Hugging Face model: hub name or local directory")
    add_sae_and_text_arguments(features_cmd, "encode")
    features_cmd.add_argument("--tokens", type=at_least(1), default=None,
                              help="positions to encode at most (default: every text)")  # fmt: skip
    features_cmd.add_argument("--out", type=Path, default=Path("fastsae_features"), help="directory for the files")
    features_cmd.add_argument("--examples", type=at_least(1), default=10, help="examples per feature")
    features_cmd.add_argument("--before", type=at_least(0), default=10, help="tokens shown before an example's")
    features_cmd.add_argument("--after", type=at_least(0), default=3, help="tokens shown after an example's")
    features_cmd.add_argument("--features", nargs="+", type=at_least(0), default=None,
                              help="the features to write (default: every one that fired)")  # fmt: skip
    features_cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    saes = load_saes(args.sae, args.hookpoint, args.device)
    model, tokenizer = load_model(args.model, args.model_dtype, args.device)
    found = top_examples(
        model, tokenizer, read_texts(args.texts), saes, n_examples=args.examples, context_size=args.context_size,
        texts_per_forward=args.texts_per_forward, max_tokens=args.tokens, keep_special_tokens=args.keep_special_tokens,
        before=args.before, after=args.after,
    )  # fmt: skip
    for name, examples in found.items():
        paths = write_examples(examples, tokenizer, args.out, args.features)
        fired = int((examples.fire_counts > 0).sum())
        print(f"{name}: {fired} of {examples.values.shape[0]} features fired on {examples.n_tokens} tokens; "
              f"wrote {', '.join(map(str, paths))}")  # fmt: skip
    return 0
