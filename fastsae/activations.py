"""Activations from real models, as [tokens, d] batches for training SAEs.

    stream = ActivationStream(model, tokenizer, texts, hookpoints=["transformer.h.6"], batch_tokens=4096)
    for batch in stream:                # {hookpoint: [batch_tokens, d] tensor}, shuffled across texts
        sae(batch["transformer.h.6"])

Any `nn.Module` works: a hook point is a submodule's name (`model.get_submodule`, or that of its
`base_model`, so that a causal LM takes its AutoModel's names), and its output (the
first element when a module returns a tuple, as transformer blocks do) is what is collected. Several
hook points come from one forward pass, which stops as soon as the last of them has run. The tokenizer
is any Hugging Face tokenizer (or a callable with the same `(texts, padding=True, truncation=True,
max_length=..., return_tensors="pt")` interface returning input_ids and attention_mask).

Padding positions are dropped, and with `drop_special_tokens` so are the tokenizer's special tokens
(BOS among them, whose activations have norms far above the rest: a known outlier source). Tokens
pass through a shuffling buffer of `buffer_tokens` on the device, so a batch mixes many texts.
`cache_dir` writes every collected token to safetensors shards on first use and reads them on later
passes (the model is not run again).

Activations saved by other means (a .npy, .pt or .safetensors file of [N, d], or [..., d]) load with
`load_activations`, and `saved_activation_batches` serves them as the same kind of batches.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .sae import DTYPES, write_atomically


class _StopForward(Exception):
    """Raised by the last hook to end a forward pass whose remaining layers nobody reads."""


def capture(model: nn.Module, hookpoints: Sequence[str], inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """{hookpoint: output [batch, seq, d]} of the named submodules for one forward pass of `model` on
    `inputs` (keyword arguments), stopping after the last hook point's module has run."""
    modules = {name: _submodule(model, name) for name in hookpoints}
    outputs: dict[str, Tensor] = {}

    def hook(name):
        def record(module, args, output):
            outputs[name] = output[0] if isinstance(output, (tuple, list)) else output
            if len(outputs) == len(modules):
                raise _StopForward

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            model(**inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in hookpoints if name not in outputs]
    if missing:
        raise ValueError(f"hook points {missing} did not run in the model's forward pass")
    return outputs


def usable_context(model: nn.Module, context_size: int) -> int:
    """`context_size`, or the positions the model numbers (a transformers config's
    max_position_embeddings) where those are fewer: longer texts would fail in its embedding lookup
    with an IndexError naming neither."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(context_size, limit) if isinstance(limit, int) else context_size


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """The submodule `name` of the model or, failing that, of its base model (transformers' models with
    a head hold the AutoModel's submodules under it: GPT-2's "h.6" is GPT2LMHeadModel's "transformer.h.6")."""
    for root in (model, getattr(model, "base_model", model)):
        try:
            return root.get_submodule(name)
        except AttributeError:
            continue
    names = [n for n, _ in model.named_modules() if n][:20]
    raise ValueError(f"the model has no submodule {name!r} (some it has: {names})")


class ActivationStream:
    """Iterable of {hookpoint: [batch_tokens, d]} batches (see the module docstring). Each pass over
    it goes through `texts` once (a list can be passed over again; a generator only once, unless the
    cache is complete); the last, partial batch is dropped. Batches are in the hook points' dtype. Texts
    are cut at `context_size` tokens, or at the model's maximum positions where fewer (`usable_context`)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        texts: Iterable[str],
        hookpoints: Sequence[str],
        batch_tokens: int = 4096,
        context_size: int = 128,
        texts_per_forward: int = 32,
        buffer_tokens: int = 2**16,
        drop_special_tokens: bool = True,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        progress: bool = True,
    ):
        if not hookpoints:
            raise ValueError("hookpoints is empty: name at least one submodule of the model")
        if batch_tokens < 1 or buffer_tokens < batch_tokens:
            raise ValueError(f"need 1 <= batch_tokens <= buffer_tokens, got {batch_tokens} and {buffer_tokens}")
        self.model, self.tokenizer, self.texts = model, tokenizer, texts
        self.hookpoints = list(hookpoints)
        self.batch_tokens, self.texts_per_forward = batch_tokens, texts_per_forward
        self.context_size = usable_context(model, context_size)
        self.buffer_tokens, self.drop_special_tokens = buffer_tokens, drop_special_tokens
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.seed, self.progress = seed, progress

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        pending: dict[str, list[Tensor]] = {name: [] for name in self.hookpoints}
        held = 0
        for chunk in self._token_chunks():
            for name in self.hookpoints:
                pending[name].append(chunk[name].to(self.device))
            held += chunk[self.hookpoints[0]].shape[0]
            if held >= self.buffer_tokens:
                # Emit about half the buffer in shuffled batches; the rest mixes with what comes next.
                mixed = self._shuffle(pending, generator)
                emit = (held - held // 2) // self.batch_tokens * self.batch_tokens
                yield from self._batches(mixed, emit)
                pending = {name: [t[emit:]] for name, t in mixed.items()}
                held -= emit
        if held >= self.batch_tokens:
            yield from self._batches(self._shuffle(pending, generator), held // self.batch_tokens * self.batch_tokens)

    def _batches(self, mixed: dict[str, Tensor], n_tokens: int) -> Iterator[dict[str, Tensor]]:
        for start in range(0, n_tokens, self.batch_tokens):
            yield {name: t[start : start + self.batch_tokens] for name, t in mixed.items()}

    def _shuffle(self, pending: dict[str, list[Tensor]], generator: torch.Generator) -> dict[str, Tensor]:
        """The pending tokens in one random order, the same for every hook point."""
        merged = {name: torch.cat(parts) for name, parts in pending.items()}
        order = torch.randperm(merged[self.hookpoints[0]].shape[0], generator=generator).to(self.device)
        return {name: t[order] for name, t in merged.items()}

    def _token_chunks(self) -> Iterator[dict[str, Tensor]]:
        """{hookpoint: [tokens, d]} per forward pass, read from the cache when it is complete."""
        if self.cache_dir is not None and (self.cache_dir / "complete").is_file():
            yield from read_cache(self.cache_dir, self.hookpoints)
            return
        chunks = self._collect()
        if self.cache_dir is None:
            yield from chunks
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for index, chunk in enumerate(chunks):
            tensors = {name: t.cpu().contiguous() for name, t in chunk.items()}
            shard = self.cache_dir / f"shard_{index:06d}.safetensors"
            write_atomically(shard, lambda tmp, tensors=tensors: save_file(tensors, tmp))
            yield chunk
        write_atomically(self.cache_dir / "complete", lambda tmp: Path(tmp).write_text("\n".join(self.hookpoints)))

    def _collect(self) -> Iterator[dict[str, Tensor]]:
        special = _special_token_ids(self.tokenizer) if self.drop_special_tokens else []
        model_device = next(self.model.parameters()).device
        batches = _batched(self.texts, self.texts_per_forward)
        for texts in tqdm(batches, desc="activations", unit=" forward", disable=not self.progress):
            inputs, keep = encode_texts(self.tokenizer, texts, self.context_size, special)
            outputs = capture(self.model, self.hookpoints, {name: t.to(model_device) for name, t in inputs.items()})
            yield {name: out[keep.to(out.device)] for name, out in outputs.items()}


def read_cache(cache_dir: str | os.PathLike, hookpoints: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """The {hookpoint: [tokens, d]} shards an ActivationStream with `cache_dir` wrote, in order."""
    cache_dir = Path(cache_dir)
    for shard in sorted(cache_dir.glob("shard_*.safetensors")):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            missing = [name for name in hookpoints if name not in f.keys()]
            if missing:
                raise ValueError(f"{shard} holds no activations for {missing} (it has {sorted(f.keys())})")
            yield {name: f.get_tensor(name) for name in hookpoints}


def load_model(name: str, model_dtype: str | None, device: str | torch.device, lm_head: bool = False):
    """(model, tokenizer) of a Hugging Face model (a hub name or a local directory): the model in
    evaluation mode on `device`, in `model_dtype` (a key of DTYPES; None: as its checkpoint stores it),
    with its language-modelling head where `lm_head` (AutoModelForCausalLM, whose base model holds the
    AutoModel's hook points); the tokenizer padding on the right (left padding would shift the positions
    of models that number them from the first token, as GPT-2 does) with its end of text token where it
    has no padding token (GPT-2's): padding positions are masked out anyway."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = DTYPES[model_dtype] if model_dtype else "auto"
    model = (AutoModelForCausalLM if lm_head else AutoModel).from_pretrained(name, dtype=dtype)
    return model.to(device).eval(), tokenizer


def encode_texts(
    tokenizer, texts: list[str], context_size: int, special_ids: Sequence[int]
) -> tuple[dict[str, Tensor], Tensor]:
    """The model's inputs {input_ids, attention_mask} [batch, seq] for `texts` (padded, cut at
    `context_size` tokens) and the positions an SAE sees there: not padding, and none of `special_ids`."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=context_size, return_tensors="pt")
    inputs = {name: encoded[name] for name in ("input_ids", "attention_mask")}
    seen = inputs["attention_mask"].bool()
    for token_id in special_ids:
        seen &= inputs["input_ids"] != token_id
    return inputs, seen


def _special_token_ids(tokenizer) -> list[int]:
    ids = getattr(tokenizer, "all_special_ids", None)
    if ids is None:
        raise ValueError("drop_special_tokens needs a tokenizer with all_special_ids (a Hugging Face tokenizer)")
    return sorted(set(ids))


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    current = []
    for item in items:
        current.append(item)
        if len(current) == size:
            yield current
            current = []
    if current:
        yield current


def _read_tensors(path: Path) -> dict[str, Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return {"array": torch.from_numpy(np.load(path, allow_pickle=False))}
    if suffix == ".pt":
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return loaded if isinstance(loaded, dict) else {"tensor": loaded}
    return load_file(path)


def load_activations(path: str | os.PathLike) -> Tensor:
    """[N, d] activations from a .npy, .pt or .safetensors file holding exactly one tensor of shape
    [..., d] (e.g. [batch, seq, d] as a transformer hook gives them: every position is a token); a clear
    ValueError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix.lower() not in (".npy", ".pt", ".safetensors"):
        raise ValueError(f"{path}: unknown format {path.suffix!r}; expected .npy, .pt or .safetensors")
    try:
        tensors = _read_tensors(path)
    except Exception as error:  # numpy, torch and safetensors each raise their own types on corrupt files
        raise ValueError(f"{path}: cannot be read as {path.suffix}: {error}") from error
    if len(tensors) != 1:
        raise ValueError(f"{path}: holds {len(tensors)} tensors ({sorted(tensors)}); expected exactly one")
    acts = next(iter(tensors.values()))
    if not isinstance(acts, torch.Tensor) or acts.dim() < 2:
        shape = tuple(acts.shape) if isinstance(acts, torch.Tensor) else type(acts).__name__
        raise ValueError(f"{path}: expected an [N, d] (or [..., d]) tensor of activations, got {shape}")
    if not acts.is_floating_point():
        raise ValueError(f"{path}: expected floating-point activations, got {acts.dtype}")
    return acts.reshape(-1, acts.shape[-1])


def saved_activation_batches(
    tensors: dict[str, Tensor], batch_tokens: int, replica: int = 0, replicas: int = 1
) -> Iterator[dict[str, Tensor]]:
    """{name: [batch_tokens, d]} batches of saved activations ({name: [N, d]}, the same N tokens for
    every name, e.g. several hook points of one model), endlessly: epoch e is the tokens in a
    permutation seeded with e (the same in every run, so a resumed run can skip the batches it trained
    on), cut into whole batches; replica r of `replicas` takes every replicas-th batch."""
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"saved activations must hold the same number of tokens each, got {sizes}")
    n_tokens = next(iter(sizes.values()))
    if n_tokens < batch_tokens * replicas:
        raise ValueError(f"{n_tokens} saved tokens are fewer than one batch of {batch_tokens} per replica")
    for epoch in itertools.count():
        order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(epoch))
        for number, start in enumerate(range(0, n_tokens - batch_tokens + 1, batch_tokens)):
            if number % replicas == replica:
                rows = order[start : start + batch_tokens]
                yield {name: t[rows] for name, t in tensors.items()}
