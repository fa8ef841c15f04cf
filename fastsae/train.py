r"""`python -m fastsae train`: SAEs on a model's activations, from text files, end to end.

    python -m fastsae train --model gpt2 --hookpoint h.6 --texts corpus.txt --tokens 20_000_000

It loads the model and tokenizer with Hugging Face transformers (a hub name or a local directory; hook
points are submodule names of `AutoModel.from_pretrained(model)`, e.g. h.6 for GPT-2, layers.6 for
Llama), streams activations of each hook point (`fastsae.activations`), runs `diagnose` on the first
tokens and prints its advice, initialises one SAE per hook point from those tokens (the chosen
centering), and trains it with AuxK (TopK) or the activation's own loss. Every --log-every tokens it
appends FVU, dead-feature % (features silent for --dead-after tokens) and tokens/s to OUT/log.csv and
redraws OUT/training.png; every --checkpoint-every tokens (and at the end) it writes each SAE
(OUT/<hookpoint>.safetensors) and the optimizer state (OUT/state.pt) as one checkpoint: a run stopped
while writing one resumes from the last whole one, never from new SAEs beside an older optimizer
state. Run it again with the same OUT to resume: the SAEs, the optimizer and the token count are
restored, the batches already used are skipped (the stream is deterministic for the same texts), and
the logs' rows after the checkpoint (logged before the run stopped, logged again as it trains them
again) are dropped. Text files hold one document per line (.txt) or one JSON object with a "text" field
per line (.jsonl).
With --eval-texts (held-out texts), each checkpoint also splices the SAEs into the model
(`fastsae.evaluate`: the model is then loaded with its language-modelling head) and appends their
loss recovered, KL divergence, FVU, L0 and alive features to OUT/eval.csv.

Activations you already have (from a model transformers does not load, or saved earlier) train the
same way, one SAE per file, named by the file's stem:

    python -m fastsae train --activations layer6.safetensors layer9.npy --tokens 20_000_000

Each file holds one [N, d] (or [..., d]) tensor, the same N tokens in each; the run goes over them
epoch after epoch, each epoch in a seeded order (so a resumed run skips what it trained on).

The optimizer is `fastsae.optim.SAEAdam` (Adam with the decoder's unit-norm constraint in its step, one
pass over each parameter: the fastest step at every benchmark shape); --optimizer adam takes torch's
fused Adam and the module's two decoder calls instead. A resumed run keeps the optimizer its state was
saved with (runs saved before the option: torch's Adam). SAEAdam's biases step at the activations'
scale (`bias_lr_scale`: their RMS per dimension about b_dec in the first tokens, printed at the start),
so that a run trains alike on activations of any scale, as on activations normalised to unit RMS
(torch's Adam steps them at --lr). The rate is --lr throughout, unless
--lr-warmup-tokens raises it linearly from 0 over the first tokens and --lr-decay-tokens lowers it
linearly to 0 over the last ones: a function of the token count, so a resumed run continues it (and
one resumed with more --tokens decays towards its new end); a resumed run takes --lr and the schedule
of its own command line. On one GPU a TopK SAE's steps run as one
captured CUDA graph each (`fastsae.graphs.CapturedStep`: the host launches one graph a step instead of
a few hundred kernels; a batch of another shape, such as a shorter last one, runs eagerly), and a
BatchTopK SAE's as two (split at its codes' exactness check); --no-capture runs every step eagerly.

The same command trains on several GPUs under torchrun, unchanged:

    torchrun --nproc-per-node 8 -m fastsae train --model gpt2 --hookpoint h.6 --texts corpus.txt \
        --feature-shards 2

Each process takes one GPU (cuda:LOCAL_RANK; gloo on CPU). The processes form a mesh of replicas x
--feature-shards (`torch.distributed.device_mesh`): the replicas train data-parallel (each reads every
replicas-th text), and the shards of one replica split the features (`SparseAutoencoder.shard_features`;
each runs the model on the same texts). --tokens counts every replica's tokens; rank 0 prints, logs
and plots; the checkpoints hold the whole SAE and resume onto the same mesh.
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .activations import ActivationStream, load_activations, load_model, saved_activation_batches
from .cli import at_least, positive_float, read_texts
from .diagnostics import diagnose
from .evaluate import evaluate
from .graphs import CapturedStep
from .optim import SAEAdam, activation_scale, step_with_decoder_constraint
from .sae import (
    ACTIVATIONS,
    CENTERING_MODES,
    DTYPES,
    NORMALIZATIONS,
    SAEConfig,
    SparseAutoencoder,
    sync_directory,
    write_atomically,
)

# The run's tables in OUT, a row per hook point each time a run logs (LOG_FILE) or evaluates (EVAL_FILE).
LOG_FILE, EVAL_FILE = "log.csv", "eval.csv"
CHECKPOINT_FILE = "checkpoint.json"  # the commit record of the last whole checkpoint: its token count
PENDING = ".pending"  # the suffix of a checkpoint's files until it is committed (`_save`)
LOG_COLUMNS = ["tokens", "hookpoint", "fvu", "dead_pct", "tokens_per_s"]
EVAL_COLUMNS = ["tokens", "hookpoint", "loss_recovered", "kl_div", "fvu", "l0", "alive", "loss_clean",
                "loss_spliced", "loss_zero"]  # fmt: skip
OPTIMIZERS = ("saeadam", "adam")  # --optimizer: fastsae.optim.SAEAdam, or torch.optim.Adam with the decoder calls


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="train SAEs on a model's activations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    train.add_argument("--model", help="Hugging Face model name or local directory")
    train.add_argument("--hookpoint", nargs="+", help="submodule names of the model, e.g. h.6")
    train.add_argument("--texts", nargs="+", type=Path, help=".txt or .jsonl files")
    train.add_argument("--activations", nargs="+", type=Path,
                       help="instead of --model/--hookpoint/--texts: saved [N, d] activations (.npy, .pt, "
                            ".safetensors), one SAE per file, named by its stem")  # fmt: skip
    train.add_argument("--eval-texts", nargs="+", type=Path,
                       help="held-out .txt or .jsonl files: at each checkpoint the SAEs' loss recovered on them "
                            "(fastsae.evaluate) goes to OUT/eval.csv")  # fmt: skip
    train.add_argument("--eval-tokens", type=at_least(1), default=2**16,
                       help="next-token predictions each evaluation scores at most")  # fmt: skip
    train.add_argument("--out", type=Path, default=Path("fastsae_run"), help="output and resume directory")
    train.add_argument("--tokens", type=at_least(1), default=10_000_000, help="training tokens per SAE")
    train.add_argument("--activation", choices=ACTIVATIONS, default="topk")
    train.add_argument("--k", type=at_least(1), default=32, help="active features per token (topk, batchtopk)")
    train.add_argument("--matryoshka-widths", nargs="+", type=at_least(1), default=(),
                       help="train a Matryoshka SAE (topk, batchtopk): the reconstructions from the first W "
                            "features alone are scored too, for each W given")  # fmt: skip
    train.add_argument("--expansion-factor", type=at_least(1), default=16, help="features per input dimension")
    train.add_argument("--centering", choices=CENTERING_MODES, default="geometric_median")
    train.add_argument("--normalize-activations", choices=NORMALIZATIONS, default="none",
                       help="layer_norm: each token standardised before the SAE (as SAELens' run-time "
                            "layer_norm)")  # fmt: skip
    train.add_argument("--lr", type=positive_float, default=None,
                       help="Adam learning rate (default 2e-4 / sqrt(F / 16384))")  # fmt: skip
    train.add_argument("--lr-warmup-tokens", type=at_least(0), default=0,
                       help="tokens over which the rate rises linearly from 0 to --lr (default 0: none)")  # fmt: skip
    train.add_argument("--lr-decay-tokens", type=at_least(0), default=0,
                       help="last tokens over which the rate falls linearly to 0 (default 0: none)")  # fmt: skip
    train.add_argument("--batch-tokens", type=at_least(2), default=4096)
    train.add_argument("--diagnose-tokens", type=at_least(1), default=2**16,
                       help="tokens diagnose and the centering see first (not trained on)")  # fmt: skip
    train.add_argument("--context-size", type=at_least(2), default=128, help="tokens per text at most")
    train.add_argument("--dead-after", type=at_least(0), default=10_000_000, help="tokens without firing: dead")
    train.add_argument("--log-every", type=at_least(1), default=100_000, help="tokens between log rows")
    train.add_argument("--checkpoint-every", type=at_least(1), default=1_000_000, help="tokens between checkpoints")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--dtype", choices=list(DTYPES), default=None, help="SAE dtype (default bf16 on CUDA)")
    train.add_argument("--model-dtype", choices=list(DTYPES), default=None,
                       help="dtype the model runs in (default: as its checkpoint stores it)")  # fmt: skip
    train.add_argument("--keep-special-tokens", action="store_true", help="keep BOS and other special tokens")
    train.add_argument("--feature-shards", type=at_least(1), default=1,
                       help="under torchrun: processes that split each SAE's features")  # fmt: skip
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                       help="saeadam (fastsae.optim.SAEAdam, the default) or adam (torch's fused Adam and the "
                            "module's decoder calls); a resumed run keeps the one it was saved with")  # fmt: skip
    train.add_argument("--no-capture", action="store_true",
                       help="run every step eagerly, not as one captured CUDA graph (see below)")  # fmt: skip
    train.set_defaults(run=run)


@dataclass
class Layout:
    """Where this process sits in a torchrun job (one process, one replica, no groups otherwise)."""

    replica: int = 0
    replicas: int = 1
    shard_group: object = None  # the processes that split one replica's features, or None
    replica_group: object = None  # the processes that hold the same features in every replica, or None

    @property
    def main(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0


def _layout(args: argparse.Namespace) -> Layout:
    """Joins the torchrun job when there is one (WORLD_SIZE > 1): the process group, this process's
    GPU (args.device becomes cuda:LOCAL_RANK) and the replicas x shards mesh."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.feature_shards < 1 or world % args.feature_shards:
        raise ValueError(f"--feature-shards must divide the {world} processes, got {args.feature_shards}")
    if world == 1:
        return Layout()
    from torch.distributed.device_mesh import init_device_mesh

    device_type = torch.device(args.device).type
    if device_type == "cuda":
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    replicas = world // args.feature_shards
    mesh = init_device_mesh(device_type, (replicas, args.feature_shards), mesh_dim_names=("replica", "shard"))
    return Layout(
        replica=mesh.get_local_rank("replica"), replicas=replicas,
        shard_group=mesh.get_group("shard") if args.feature_shards > 1 else None,
        replica_group=mesh.get_group("replica") if replicas > 1 else None,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    _run(args)
    if dist.is_initialized():  # a torchrun job: the run's objects that hold the group go first
        gc.collect()  # (gloo's threads abort a process that leaves them to the interpreter's shutdown)
        dist.barrier()  # and every process finishes its last collective before any leaves
        dist.destroy_process_group()
    return 0


def _run(args: argparse.Namespace) -> None:
    _check_source(args)
    layout = _layout(args)
    say = print if layout.main else lambda *_, **__: None
    model, tokenizer = None, None
    if not args.activations:  # with --eval-texts with its head, which scores the splices (`_evaluate`)
        model, tokenizer = load_model(args.model, args.model_dtype, args.device, lm_head=bool(args.eval_texts))
    batches = _batches(args, layout, model, tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    if layout.main:
        _finish_checkpoint(args.out)  # one that a stopped run had committed but not yet moved into place
    _barrier()
    state_path = _state_path(args.out, layout)
    resumed = state_path.is_file()
    if resumed:
        saes = {}
        for name in args.hookpoint:
            saes[name] = _distribute(SparseAutoencoder.load(_checkpoint(args.out, name), args.device), layout)
        state = torch.load(state_path, map_location=args.device, weights_only=True)
        tokens_done, used_batches = int(state["tokens"]), int(state["batches"])
        args.optimizer = _resumed_optimizer(args.optimizer, state, state_path)
        for _ in range(used_batches):  # the diagnosis sample and the batches already trained on
            next(batches)
        say(f"resuming from {args.out} at {tokens_done} tokens")
    else:
        sample, used_batches = _first_tokens(batches, args.hookpoint, args.diagnose_tokens)
        saes = {}
        for name in args.hookpoint:
            saes[name] = _new_sae(args, sample[name], layout)  # first: a config error (k > features) costs no diagnosis
            say(f"== {name}: diagnose on {sample[name].shape[0]} tokens")
            if layout.main:
                print(
                    diagnose(sample[name].float(), k=args.k, n_features=args.expansion_factor * sample[name].shape[1])
                )
        tokens_done, state = 0, None
    args.optimizer = args.optimizer or "saeadam"
    capture = _captures(args, layout)
    optimizers = {}
    for name, sae in saes.items():
        # SAEAdam's biases at the activations' scale (a resumed run's come with its optimizer state)
        scale = activation_scale(sae, sample[name]) if state is None and args.optimizer == "saeadam" else 1.0
        if scale != 1.0:
            say(f"== {name}: the biases' rate x {scale:.3g} (the activations' RMS per dimension about b_dec)")
        optimizers[name] = _optimizer(args, sae, capture, scale)
    if state is not None:
        for name, optimizer in optimizers.items():
            _load_optimizer_state(optimizer, state["optimizers"][name])
    evaluate_saes = partial(_evaluate, args, layout, model, tokenizer) if args.eval_texts else None
    _train(args, layout, saes, optimizers, batches, tokens_done, used_batches, evaluate_saes)


def _captures(args: argparse.Namespace, layout: Layout) -> bool:
    """Whether the steps run as captured CUDA graphs (fastsae.graphs.CapturedStep): TopK and BatchTopK
    SAEs on one GPU, unless --no-capture. (The ReLU and JumpReLU SAEs' steps have not been measured
    captured; the multi-process layouts' steps are not captured yet.)"""
    single = layout.replica_group is None and layout.shard_group is None
    captured = args.activation in ("topk", "batchtopk")
    return not args.no_capture and captured and single and torch.device(args.device).type == "cuda"


def _resumed_optimizer(asked: str | None, state: dict, state_path: Path) -> str:
    """The optimizer whose state `state` holds (states saved before --optimizer existed: torch's Adam),
    which a resumed run keeps: asking for the other one is an error, not a silent fresh start."""
    saved = state.get("optimizer", "adam")
    if asked is not None and asked != saved:
        raise ValueError(
            f"{state_path} holds the state of --optimizer {saved}; resume with --optimizer {saved}, or start "
            f"the {asked} run in another --out"
        )
    return saved


def _optimizer(
    args: argparse.Namespace, sae: SparseAutoencoder, capture: bool, bias_lr_scale: float
) -> torch.optim.Optimizer:  # fmt: skip
    """SAEAdam (its biases' rate scaled by `bias_lr_scale`), or torch's Adam (its fused kernel on CUDA: one
    launch over the parameters), capturable for a captured step. With a schedule the rate is a tensor on
    the SAE's device, which `_set_lr` fills before each step and the kernels read (a captured step's
    replays too)."""
    lr = _lr(args, sae)
    if _scheduled(args):
        lr = torch.tensor(lr, dtype=torch.float32, device=sae.W_enc.device)
    if args.optimizer == "saeadam":
        return SAEAdam(sae, lr=lr, capturable=capture, bias_lr_scale=bias_lr_scale)
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=sae.W_enc.is_cuda, capturable=capture)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """The saved state, run with this run's kernel and rate, which the saved groups would otherwise set:
    a run saved eagerly or on another device resumes captured, and the other way round, and it takes
    --lr and the schedule of its command line. SAEAdam holds the loaded step counts in its own form (its
    `load_state_dict`); torch's capturable and fused Adam keep each one on the parameter's device, the
    others on the host."""
    kept = [{key: group[key] for key in ("lr", "fused", "capturable") if key in group}
            for group in optimizer.param_groups]  # fmt: skip
    optimizer.load_state_dict(state)
    for group, settings, saved in zip(optimizer.param_groups, kept, state["param_groups"]):
        group.update(settings)
        if isinstance(optimizer, SAEAdam):  # the biases' rate of the run it resumes (1 before it had one)
            group["bias_lr_scale"] = saved.get("bias_lr_scale", 1.0)
            continue
        for param in group["params"]:
            param_state = optimizer.state.get(param, {})
            if "step" in param_state:
                step = param_state["step"].to(torch.float32)
                param_state["step"] = step.to(param.device) if group["fused"] or group["capturable"] else step.cpu()


def _check_source(args: argparse.Namespace) -> None:
    """Either a model (--model, --hookpoint, --texts) or saved activations (--activations, whose file
    stems become the hook points' names)."""
    model_args = {"--model": args.model, "--hookpoint": args.hookpoint, "--texts": args.texts}
    if args.activations:
        if args.eval_texts:
            raise ValueError("--eval-texts scores the SAEs in their model: it needs --model, not --activations")
        given = [flag for flag, value in model_args.items() if value]
        if given:
            raise ValueError(f"--activations trains on saved activations; {', '.join(given)} belong to a model")
        args.hookpoint = [path.stem for path in args.activations]
        if len(set(args.hookpoint)) != len(args.hookpoint):
            raise ValueError(f"--activations files need distinct names (their stems name the SAEs): {args.hookpoint}")
    elif not all(model_args.values()):
        missing = [flag for flag, value in model_args.items() if not value]
        raise ValueError(f"give --model, --hookpoint and --texts (missing {', '.join(missing)}), or --activations")


def _batches(args: argparse.Namespace, layout: Layout, model, tokenizer) -> Iterator[dict]:
    """This replica's {hookpoint: [batch_tokens, d]} batches: from the model run on the texts, or from
    the saved activations (epoch after epoch)."""
    if args.activations:
        tensors = {path.stem: load_activations(path) for path in args.activations}
        batches = saved_activation_batches(tensors, args.batch_tokens, layout.replica, layout.replicas)
        return ({name: t.to(args.device) for name, t in batch.items()} for batch in batches)
    texts = itertools.islice(read_texts(args.texts), layout.replica, None, layout.replicas)  # this replica's
    stream = ActivationStream(
        model, tokenizer, texts, args.hookpoint, batch_tokens=args.batch_tokens,
        context_size=args.context_size, buffer_tokens=max(16 * args.batch_tokens, 2**16),
        drop_special_tokens=not args.keep_special_tokens, device=args.device,
    )  # fmt: skip
    return iter(stream)


def _distribute(sae: SparseAutoencoder, layout: Layout) -> SparseAutoencoder:
    """The whole SAE made this process's part of it: its features' shard, one replica of the data."""
    if layout.shard_group is not None:
        sae.shard_features(layout.shard_group)
    if layout.replica_group is not None:
        sae.data_parallel(layout.replica_group)
    return sae


def _state_path(out: Path, layout: Layout) -> Path:
    """The optimizer state and counts; one file per feature shard (the shards' Adam states differ)."""
    if layout.shard_group is None:
        return out / "state.pt"
    return out / f"state.shard{dist.get_rank(layout.shard_group)}.pt"


def _checkpoint(out: Path, hookpoint: str) -> Path:
    return out / f"{hookpoint}.safetensors"


def _first_tokens(batches: Iterator[dict], hookpoints: list[str], n_tokens: int) -> tuple[dict[str, torch.Tensor], int]:
    """Up to n_tokens tokens per hook point (consumed from the stream: not trained on), and how many
    batches they took."""
    taken: dict[str, list[torch.Tensor]] = {name: [] for name in hookpoints}
    count = 0
    for batch in batches:
        for name in hookpoints:
            taken[name].append(batch[name])
        count += batch[hookpoints[0]].shape[0]
        if count >= n_tokens:
            break
    if count < 2:
        raise ValueError("the texts gave fewer than one batch of activations: nothing to train on")
    return {name: torch.cat(parts) for name, parts in taken.items()}, len(taken[hookpoints[0]])


def _new_sae(args: argparse.Namespace, sample: torch.Tensor, layout: Layout) -> SparseAutoencoder:
    dtype = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    d = sample.shape[1]
    cfg = SAEConfig(d_in=d, n_features=args.expansion_factor * d, activation=args.activation, k=args.k,
                    centering=args.centering, dtype=dtype, dead_after_tokens=args.dead_after,
                    matryoshka_widths=tuple(args.matryoshka_widths),
                    normalize_activations=args.normalize_activations)  # fmt: skip
    with torch.device(args.device):  # this process's features, built where they train
        sae = SparseAutoencoder(cfg, feature_group=layout.shard_group)
    if layout.replica_group is not None:
        sae.data_parallel(layout.replica_group)
    return sae.initialize(sample.to(DTYPES[dtype]))


def _lr(args: argparse.Namespace, sae: SparseAutoencoder) -> float:
    """The given rate, else Gao et al.'s scaling with the number of features (2e-4 at 16384)."""
    return args.lr if args.lr is not None else 2e-4 / (sae.cfg.n_features / 2**14) ** 0.5


def _scheduled(args: argparse.Namespace) -> bool:
    return bool(args.lr_warmup_tokens or args.lr_decay_tokens)


def _lr_factor(args: argparse.Namespace, start: int, end: int) -> float:
    """The schedule's factor of the rate for the step over tokens start .. end of the run: rising
    linearly over the first --lr-warmup-tokens (the step's last token counts, so that the first step
    moves), falling linearly to 0 over the last --lr-decay-tokens (from the step's first token). A
    function of the token count alone, so a resumed run continues it where it stopped."""
    warmup = min(1.0, end / args.lr_warmup_tokens) if args.lr_warmup_tokens else 1.0
    decay = min(1.0, max(0, args.tokens - start) / args.lr_decay_tokens) if args.lr_decay_tokens else 1.0
    return warmup * decay


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Fills the optimizer's rate tensors (`_optimizer`'s, one launch each, no synchronisation)."""
    for rate in {id(group["lr"]): group["lr"] for group in optimizer.param_groups}.values():
        rate.fill_(lr)


def _train(args, layout: Layout, saes, optimizers, batches, tokens_done: int, used_batches: int, evaluate_saes) -> None:
    """The training loop: log rows every --log-every tokens, a checkpoint (and with `evaluate_saes`, an
    evaluation) every --checkpoint-every tokens and at the end."""
    models = {  # DistributedDataParallel over the replicas: it averages their gradients
        name: DistributedDataParallel(sae, process_group=layout.replica_group)
        if layout.replica_group is not None else sae
        for name, sae in saes.items()
    }  # fmt: skip
    # One captured graph per SAE, for batches of the first batch's shape (a shorter last batch runs eagerly)
    captured = (
        {name: CapturedStep(sae, optimizers[name]) for name, sae in saes.items()} if _captures(args, layout) else {}
    )
    captured_shapes: dict[str, torch.Size] = {}

    def checkpoint(tokens_done: int, used_batches: int) -> None:
        _save(args, layout, saes, optimizers, tokens_done, used_batches)
        if evaluate_saes is not None:
            evaluate_saes(saes, tokens_done)

    saved_at = None
    log_path = args.out / LOG_FILE
    if layout.main:  # a resumed run's tables as of its checkpoint
        _keep_rows_up_to(log_path, LOG_COLUMNS, tokens_done)
        _keep_rows_up_to(args.out / EVAL_FILE, EVAL_COLUMNS, tokens_done)
    new_log = not log_path.is_file()
    next_log = (tokens_done // args.log_every + 1) * args.log_every
    next_checkpoint = (tokens_done // args.checkpoint_every + 1) * args.checkpoint_every
    window_start, window_tokens = time.perf_counter(), 0
    with open(log_path, "a", newline="") if layout.main else _nowhere() as log_file:
        log = csv.writer(log_file)
        if new_log:
            log.writerow(LOG_COLUMNS)
        fvus: dict[str, float] = {}
        while tokens_done < args.tokens:
            batch = next(batches, None)
            n = _tokens_in_step(batch, args, layout)
            if n is None:  # a replica's texts ran out: every process stops at the same step
                break
            if _scheduled(args):
                factor = _lr_factor(args, tokens_done, tokens_done + n)
                for name, sae in saes.items():
                    _set_lr(optimizers[name], _lr(args, sae) * factor)
            for name, sae in saes.items():
                x = batch[name].to(sae.W_enc.dtype)
                if name in captured and captured_shapes.setdefault(name, x.shape) == x.shape:
                    fvus[name] = captured[name](x).fvu.clone()  # the graph's tensor: the next replay rewrites it
                    continue
                out = models[name](x)
                out.loss.backward()
                step_with_decoder_constraint(sae, optimizers[name])
                optimizers[name].zero_grad(set_to_none=True)
                fvus[name] = out.fvu.detach()
            tokens_done += n
            used_batches += 1
            window_tokens += n
            if tokens_done >= next_log or tokens_done >= args.tokens:
                rate = window_tokens / (time.perf_counter() - window_start)
                for name, sae in saes.items():
                    dead = 100 * float(_dead_features(sae, layout)) / sae.cfg.n_features
                    log.writerow([tokens_done, name, f"{float(fvus[name]):.5f}", f"{dead:.2f}", f"{rate:.0f}"])
                    if layout.main:
                        lr = f"  lr {_lr(args, sae) * factor:.3g}" if _scheduled(args) else ""
                        print(f"{tokens_done:>12} tokens  {name}: FVU {float(fvus[name]):.4f}  dead {dead:.1f}%  "
                              f"{rate:,.0f} tokens/s{lr}")  # fmt: skip
                if layout.main:
                    log_file.flush()
                    _plot(log_path, args.out / "training.png")
                next_log += args.log_every
                window_start, window_tokens = time.perf_counter(), 0
            if tokens_done >= next_checkpoint:
                checkpoint(tokens_done, used_batches)
                saved_at = tokens_done
                next_checkpoint += args.checkpoint_every
    if saved_at != tokens_done:  # (not twice when the last step ended on a checkpoint)
        checkpoint(tokens_done, used_batches)
    if layout.main:
        print(f"trained on {tokens_done} tokens; SAEs and state in {args.out}")


def _keep_rows_up_to(path: Path, columns: list[str], tokens_done: int) -> None:
    """Rewrites the table at `path` (if there is one) without its rows after `tokens_done`, the
    checkpoint a run resumes from, and without a row that a stopped run left cut short: the steps
    after the checkpoint were logged before the run stopped and are trained and logged again now, so
    that otherwise their token counts would appear twice, with other figures. Atomic
    (`write_atomically`), and only where a row goes; says how many went."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        text = f.read()
    rows = list(csv.reader(text.splitlines()))
    complete = text.endswith("\n")
    body = rows[1:] if complete else rows[1:-1]  # (a last row written in part goes)
    kept = [row for row in body if len(row) == len(columns) and row[0].isdigit() and int(row[0]) <= tokens_done]
    if rows[:1] == [columns] and complete and len(kept) == len(body):
        return

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([columns, *kept])

    write_atomically(path, write)
    dropped = len(rows) - 1 - len(kept)  # (the header, and no rows, where it was cut short)
    if dropped > 0:
        print(f"{path}: left out {dropped} rows logged after {tokens_done} tokens, where this run starts")


def _nowhere():
    """The log file of a process that does not log."""
    return open(os.devnull, "w", newline="")


def _tokens_in_step(batch: dict | None, args, layout: Layout) -> int | None:
    """The tokens this step trains on over every replica, or None when any replica has no batch left
    (one all-reduce per step in a torchrun job, so that every process stops at the same step)."""
    n = 0 if batch is None else batch[args.hookpoint[0]].shape[0]
    if not dist.is_initialized():
        return None if batch is None else n
    first_shard = layout.shard_group is None or dist.get_rank(layout.shard_group) == 0
    status = torch.tensor([int(batch is None), n if first_shard else 0], device=args.device)
    dist.all_reduce(status)
    return None if int(status[0]) else int(status[1])


def _dead_features(sae: SparseAutoencoder, layout: Layout) -> torch.Tensor:
    """How many features are dead, over every shard."""
    dead = sae.dead_features().sum()
    if layout.shard_group is not None:
        dist.all_reduce(dead, group=layout.shard_group)
    return dead


def _evaluate(args, layout: Layout, model, tokenizer, saes, tokens_done: int) -> None:
    """The SAEs' scores in the model on --eval-texts (fastsae.evaluate), appended to OUT/eval.csv. Every
    process evaluates (a feature-sharded SAE's forward needs each of its shards); rank 0 writes."""
    scores = evaluate(
        model, tokenizer, read_texts(args.eval_texts), saes, context_size=args.context_size,
        max_predictions=args.eval_tokens, keep_special_tokens=args.keep_special_tokens,
    )  # fmt: skip
    if not layout.main:
        return
    path = args.out / EVAL_FILE
    new_file = not path.is_file()
    with open(path, "a", newline="") as f:
        rows = csv.writer(f)
        if new_file:
            rows.writerow(EVAL_COLUMNS)
        for name, score in scores.items():
            rows.writerow([tokens_done, name, *(f"{getattr(score, column):.5f}" for column in EVAL_COLUMNS[2:])])
            print(f"{tokens_done:>12} tokens  {name}: loss recovered {score.loss_recovered:.4f}  "
                  f"KL {score.kl_div:.4f}  (held-out texts)")  # fmt: skip
    _plot(args.out / LOG_FILE, args.out / "training.png")


def _save(args, layout: Layout, saes, optimizers, tokens_done: int, used_batches: int) -> None:
    """A checkpoint, committed as one: each SAE (every process takes part; rank 0 writes it whole) and
    the optimizer state with the counts a resumed run continues from (the first replica writes each
    shard's) are written beside their files as pending (`_pending`); once every process has written
    its part, rank 0 writes the commit record (CHECKPOINT_FILE) and moves them into place
    (`_finish_checkpoint`). A run stopped before the record resumes from the checkpoint before, whole;
    one stopped after it moves the rest into place when it resumes."""
    for name, sae in saes.items():
        sae.save(_pending(_checkpoint(args.out, name), tokens_done))
    if layout.replica == 0:
        optimizer_states = {name: opt.state_dict() for name, opt in optimizers.items()}
        state = {
            "tokens": tokens_done, "batches": used_batches, "optimizer": args.optimizer, "optimizers": optimizer_states
        }  # fmt: skip
        write_atomically(_pending(_state_path(args.out, layout), tokens_done), lambda tmp: torch.save(state, tmp))
    _barrier()
    if layout.main:
        record = json.dumps({"tokens": tokens_done})
        write_atomically(args.out / CHECKPOINT_FILE, lambda tmp: Path(tmp).write_text(record))
        _finish_checkpoint(args.out)
    _barrier()


def _pending(path: Path, tokens_done: int) -> Path:
    """Where the checkpoint at `tokens_done` writes `path` until it is committed."""
    return path.with_name(f"{path.name}.{tokens_done}{PENDING}")


def _finish_checkpoint(out: Path) -> None:
    """Moves the pending files of the checkpoint that CHECKPOINT_FILE commits into place and removes
    any other pending file (a checkpoint stopped before its commit)."""
    record = out / CHECKPOINT_FILE
    committed = str(json.loads(record.read_text())["tokens"]) if record.is_file() else None
    changed = False
    for pending in out.glob(f"*{PENDING}"):
        name, _, tokens = pending.name[: -len(PENDING)].rpartition(".")
        if not (name and tokens.isdigit()):  # not a checkpoint's: left alone
            continue
        if tokens == committed:
            os.replace(pending, out / name)
        else:
            pending.unlink()
        changed = True
    if changed:
        sync_directory(out)


def _barrier() -> None:
    """Every process of a torchrun job waits here for the others (nothing to wait for alone)."""
    if dist.is_initialized():
        dist.barrier()


def _plot(log_path: Path, png_path: Path) -> None:
    """FVU and dead features against tokens, per hook point, and the loss recovered on the held-out
    texts where the run evaluates (eval.csv beside the log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_rows(log_path)
    eval_path = log_path.with_name(EVAL_FILE)
    evaluations = _read_rows(eval_path) if eval_path.is_file() else []
    panels = [("fvu", "FVU", rows), ("dead_pct", "dead features (%)", rows)]
    if evaluations:
        panels.append(("loss_recovered", "loss recovered (held-out texts)", evaluations))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    for axis, (column, label, table) in zip(axes, panels):
        for name in sorted({row["hookpoint"] for row in table}):
            mine = [row for row in table if row["hookpoint"] == name]
            axis.plot([int(row["tokens"]) for row in mine], [float(row[column]) for row in mine], label=name)
        axis.set(xlabel="tokens", ylabel=label)
    axes[0].set_yscale("log")
    axes[0].legend()
    figure.tight_layout()
    write_atomically(png_path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
