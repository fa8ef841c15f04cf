r"""An SAE in its model: the language model's next-token loss with the SAE's reconstruction in place of
the activations it was trained on, the measure SAE papers report beside FVU and L0.

    scores = evaluate(model, tokenizer, texts, {"h.6": sae})   # model: a causal LM (logits)
    scores["h.6"].loss_recovered, scores["h.6"].kl_div

For each batch of texts the model runs once clean and, for each hook point alone, twice more: with the
SAE's reconstruction spliced in (the hook point's output replaced at the positions the SAE trains on:
every token but padding and, unless `keep_special_tokens`, the tokenizer's special tokens, as
`ActivationStream` collects them) and with those positions zeroed (zero ablation). Then

    loss_recovered = (loss_zero - loss_spliced) / (loss_zero - loss_clean)

is 1 where the reconstruction costs the model nothing and 0 where it does no better than zeros (SAELens'
"CE loss score", the "fraction of loss recovered" of Bricken et al. 2023 and Gao et al. 2024). `kl_div`
is the mean KL divergence of the spliced next-token distribution from the clean one (it does not depend
on which token came next). The losses are means over every next-token prediction whose target is a
real token; `fvu`, `l0` (mean non-zero codes per token) and `alive` (the fraction of features that
fired on at least one token) are the SAE's over the spliced positions.

A hook point is a submodule name of the model or, as `python -m fastsae train` names them (submodules
of transformers' AutoModel), of its `base_model`: "h.6" finds GPT-2's `transformer.h.6`.

    python -m fastsae evaluate --model gpt2 --sae gpt2_h6/h.6.safetensors --texts held_out.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from . import functional as F
from .activations import _batched, _special_token_ids, _submodule, encode_texts, load_model, usable_context
from .cli import add_sae_and_text_arguments, at_least, load_saes, read_texts
from .sae import SparseAutoencoder, write_atomically


@dataclass
class SpliceScores:
    """One hook point's scores (see the module docstring); `n_tokens`: the positions spliced,
    `n_predictions`: the next-token predictions the losses average."""

    hookpoint: str
    n_tokens: int
    n_predictions: int
    loss_clean: float
    loss_spliced: float
    loss_zero: float
    loss_recovered: float
    kl_div: float
    fvu: float
    l0: float
    alive: float


class _Sums:
    """A hook point's running sums over the batches, in fp64."""

    def __init__(self, d: int, n_features: int, device: torch.device):
        self.loss_spliced = self.loss_zero = self.kl = 0.0
        self.fired = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.n_tokens, self.l0 = 0, 0.0
        self.squared_error, self.sum_of_squares = 0.0, 0.0
        self.total = torch.zeros(d, dtype=torch.float64, device=device)

    def add_codes(self, x: Tensor, out) -> None:
        """An SAE forward's statistics: x [n, d] and its SAEOutput."""
        x64 = x.double()
        self.n_tokens += x.shape[0]
        self.squared_error += float((x64 - out.recon.double()).pow(2).sum())
        self.sum_of_squares += float(x64.pow(2).sum())
        self.total += x64.sum(0)
        if out.idx is not None:
            self.fired += F.fire_counts(out.idx, self.fired.shape[0], out.vals)
            self.l0 += float((out.vals != 0).sum())
        else:
            self.fired += F.fire_counts_dense(out.acts)
            self.l0 += float((out.acts != 0).sum())

    def fvu(self) -> float:
        """Squared error over the total variance of the spliced activations (around their mean)."""
        variance = self.sum_of_squares - float(self.total.pow(2).sum()) / self.n_tokens
        return self.squared_error / variance if variance > 0 else math.nan


def evaluate(
    model: nn.Module,
    tokenizer,
    texts: Iterable[str],
    saes: dict[str, SparseAutoencoder],
    context_size: int = 128,
    texts_per_forward: int = 8,
    max_predictions: int | None = None,
    keep_special_tokens: bool = False,
) -> dict[str, SpliceScores]:
    """{hook point: SpliceScores} of `saes` spliced into `model` (a causal LM whose forward returns
    logits [batch, seq, vocab], or an output with .logits) over `texts`, tokenized by `tokenizer` (a
    Hugging Face tokenizer) in batches of `texts_per_forward` truncated to `context_size` tokens (or the
    model's maximum positions, where fewer), until
    `max_predictions` next-token predictions have been scored (None: every text). The SAEs run in
    evaluation mode (their statistics untouched), as does the model, and both are left in the mode they
    were in."""
    if not saes:
        raise ValueError("saes is empty: give {hook point: SAE}")
    if context_size < 2 or texts_per_forward < 1:
        raise ValueError(f"need context_size >= 2 and texts_per_forward >= 1, got {context_size}, {texts_per_forward}")
    context_size = usable_context(model, context_size)
    modules = {name: _submodule(model, name) for name in saes}
    special = [] if keep_special_tokens else _special_token_ids(tokenizer)
    device = next(model.parameters()).device
    sums = {name: _Sums(sae.cfg.d_in, sae.cfg.n_features, next(sae.parameters()).device) for name, sae in saes.items()}
    clean_loss, n_predictions = 0.0, 0
    # (a model in training mode would score through dropout)
    with evaluation_mode(model, *saes.values()), torch.no_grad():
        for batch in _batched(texts, texts_per_forward):
            inputs, spliced = encode_texts(tokenizer, batch, context_size, special)
            inputs, spliced = {name: t.to(device) for name, t in inputs.items()}, spliced.to(device)
            real = inputs["attention_mask"].bool()
            targets = real[:, 1:] & real[:, :-1]  # real tokens predicted from real tokens (any padding side)
            clean = _log_probs(model, inputs)
            clean_loss += float(_cross_entropy(clean, inputs, targets))
            n_predictions += int(targets.sum())
            for name, sae in saes.items():
                _score_splices(model, inputs, spliced, targets, clean, modules[name], name, sae, sums[name])
            if max_predictions is not None and n_predictions >= max_predictions:
                break
    if n_predictions == 0:
        raise ValueError("the texts gave no next-token prediction to score (each needs at least 2 tokens)")
    loss_clean = clean_loss / n_predictions
    scores = {}
    for name, record in sums.items():
        if record.n_tokens == 0:
            raise ValueError(f"{name}: no position to splice (every token was padding or a special token)")
        spliced_loss, zero_loss = record.loss_spliced / n_predictions, record.loss_zero / n_predictions
        # (+ 0.0: a reconstruction no better than zeros scores 0, not -0)
        recovered = (zero_loss - spliced_loss) / (zero_loss - loss_clean) + 0.0 if zero_loss != loss_clean else math.nan
        scores[name] = SpliceScores(
            hookpoint=name, n_tokens=record.n_tokens, n_predictions=n_predictions, loss_clean=loss_clean,
            loss_spliced=spliced_loss, loss_zero=zero_loss, loss_recovered=recovered,
            kl_div=record.kl / n_predictions, fvu=record.fvu(), l0=record.l0 / record.n_tokens,
            alive=float((record.fired > 0).double().mean()),
        )  # fmt: skip
    return scores


def _score_splices(model, inputs, spliced, targets, clean, module, name, sae, record: _Sums) -> None:
    """Adds one batch's spliced and zero-ablated losses and KL divergence at one hook point to `record`
    (`clean`: the clean log-probabilities)."""
    with _replaced(module, name, spliced, lambda x: _reconstruct(name, sae, x, record)):
        log_probs = _log_probs(model, inputs)
    record.loss_spliced += float(_cross_entropy(log_probs, inputs, targets))
    record.kl += float(_kl_div(clean, log_probs, targets))
    with _replaced(module, name, spliced, torch.zeros_like):
        record.loss_zero += float(_cross_entropy(_log_probs(model, inputs), inputs, targets))


def _log_probs(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """fp32 log-probabilities [batch, seq - 1, vocab] of each next token."""
    output = model(**inputs)
    logits = output.logits if hasattr(output, "logits") else output
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError("the model must return logits [batch, seq, vocab] (a causal LM), or an output with .logits")
    return torch_F.log_softmax(logits[:, :-1].float(), dim=-1)


def _cross_entropy(log_probs: Tensor, inputs: dict[str, Tensor], targets: Tensor) -> Tensor:
    """Summed next-token loss over the predictions `targets` marks."""
    picked = log_probs.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    return -(picked * targets).double().sum()


def _kl_div(clean: Tensor, spliced: Tensor, targets: Tensor) -> Tensor:
    """Summed KL(clean || spliced) over the predictions `targets` marks."""
    per_position = (clean.exp() * (clean - spliced)).sum(-1)
    return (per_position * targets).double().sum()


@contextlib.contextmanager
def evaluation_mode(*modules: nn.Module) -> Iterator[None]:
    """Within the block the modules run in evaluation mode; after it each is in the mode it was in."""
    modes = {module: module.training for module in modules}
    try:
        for module in modes:
            module.eval()
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def sae_input(name: str, sae: SparseAutoencoder, x: Tensor) -> Tensor:
    """A hook point's activations x [n, d] on the SAE's device and in its dtype, after checking that the
    SAE for hook point `name` reads their width."""
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"{name}: its output has {x.shape[-1]} dimensions, the SAE for it d_in={sae.cfg.d_in}")
    return x.to(device=sae.W_enc.device, dtype=sae.W_enc.dtype)


def _reconstruct(name: str, sae: SparseAutoencoder, x: Tensor, record: _Sums) -> Tensor:
    """The SAE's reconstruction of x [n, d] (in x's dtype, on x's device), its statistics recorded."""
    sae_x = sae_input(name, sae, x)
    if x.shape[0] == 0:  # a batch of padding and special tokens only
        return x
    out = sae(sae_x)
    record.add_codes(x.to(sae_x.device), out)
    return out.recon.to(device=x.device, dtype=x.dtype)


@contextlib.contextmanager
def _replaced(module: nn.Module, name: str, positions: Tensor, replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, `module`'s output (its first element when it returns a tuple) is replaced at
    the `positions` [batch, seq] by `replace(output[positions])` [n, d]."""

    def hook(module: nn.Module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if hidden.shape[:2] != positions.shape:
            raise ValueError(
                f"{name} returns {tuple(hidden.shape)}, not [batch, seq, d] for the batch's "
                f"{tuple(positions.shape)} tokens: not a hook point whose output an SAE reconstructs"
            )
        hidden = hidden.clone()
        hidden[positions] = replace(hidden[positions])
        return type(output)([hidden, *output[1:]]) if isinstance(output, (tuple, list)) else hidden

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------
# Command line: python -m fastsae evaluate


def add_parser(commands) -> None:
    evaluate_cmd = commands.add_parser(
        "evaluate", help="an SAE's loss recovered in its model", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    evaluate_cmd.add_argument("--model", required=True, help="Hugging Face causal LM: hub name or local directory")
    add_sae_and_text_arguments(evaluate_cmd, "splice")
    evaluate_cmd.add_argument("--tokens", type=at_least(1), default=None,
                              help="next-token predictions to score at most (default: every text)")  # fmt: skip
    evaluate_cmd.add_argument("--json", type=Path, default=None, help="also write the scores to this JSON file")
    evaluate_cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    saes = load_saes(args.sae, args.hookpoint, args.device)
    model, tokenizer = load_model(args.model, args.model_dtype, args.device, lm_head=True)
    scores = evaluate(
        model, tokenizer, read_texts(args.texts), saes, context_size=args.context_size,
        texts_per_forward=args.texts_per_forward, max_predictions=args.tokens,
        keep_special_tokens=args.keep_special_tokens,
    )  # fmt: skip
    print(format_scores(scores))
    if args.json is not None:
        text = json.dumps({name: asdict(score) for name, score in scores.items()}, indent=2)
        write_atomically(args.json, lambda tmp: Path(tmp).write_text(text))
    return 0


def format_scores(scores: dict[str, SpliceScores]) -> str:
    """A markdown table, a row per hook point."""
    columns = ("loss_recovered", "kl_div", "fvu", "l0", "alive", "loss_clean", "loss_spliced", "loss_zero", "n_tokens")
    lines = ["| hook point | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, score in scores.items():
        values = [getattr(score, column) for column in columns]
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in values) + " |")
    return "\n".join(lines)
