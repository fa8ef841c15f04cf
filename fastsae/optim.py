"""`SAEAdam`: Adam for a `SparseAutoencoder` with the decoder's unit-norm constraint fused into its step.

    optimizer = fastsae.optim.SAEAdam(sae, lr=2e-4)       # instead of torch.optim.Adam(sae.parameters())
    out = sae(x); out.loss.backward(); optimizer.step(); optimizer.zero_grad()

One `step()` does what `sae.remove_decoder_parallel_grad()`, `torch.optim.Adam.step()` and
`sae.normalize_decoder()` do together. On W_dec it is one pass over the rows (`F.decoder_adam_`: the
gradient without its component along the row, Adam's update, the row renormalised). The other
parameters take Adam's update, step for step: on CUDA one pass over each (`F.adam_`, fp32 arithmetic:
on the H200 it takes the Llama-8B shape's bf16 encoder in less than half the time of torch's fused Adam
kernel), elsewhere torch.optim.Adam's multi-tensor update. `state_dtype=torch.float32` keeps the
moments in fp32 for bf16 parameters (torch.optim.Adam keeps them in the parameters' dtype); those
parameters are then updated in fp32 and rounded once.

`capturable=True` keeps the step counts on the parameters' device, as torch.optim.Adam's capturable
option does, so that `fastsae.graphs.CapturedStep` can replay the step in a CUDA graph: the bias
corrections are computed on the device (off CUDA, the encoder and the biases take torch's fused Adam
kernel, torch.optim.Adam(fused=True, capturable=True)'s update). It keeps the moments in the
parameters' dtype.

`lr` may be a 0-dim tensor on the SAE's device, as torch.optim.Adam's may: the kernels read it at every
step, so a learning-rate schedule (any `torch.optim.lr_scheduler`, which fills the tensor in place, or
your own `lr.fill_(...)`) reaches a captured step's replays, where a number is fixed at capture.

`bias_lr_scale` multiplies the biases' rate (b_enc, b_dec, a JumpReLU SAE's thresholds). Adam moves a
parameter by about lr a step whatever its scale. That suits W_enc and the unit-norm W_dec, whose scale
does not depend on the activations', but the biases are in the activations' units: on activations 100
times smaller the same rate moves them 100 times too far. With `bias_lr_scale=activation_scale(sae,
sample)` (the sample's RMS per dimension about b_dec) training does not depend on the activations'
scale: it is the training on activations normalised to unit RMS, to Adam's eps (Adam's updates do not
change with their gradients' scale). The default 1.0 is torch.optim.Adam's step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from .sae import SparseAutoencoder


class SAEAdam(torch.optim.Optimizer):
    """Adam (no weight decay, no AMSGrad) over every parameter of `sae`, the decoder's constraint
    included (see the module docstring)."""

    def __init__(
        self, sae: SparseAutoencoder, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, state_dtype: torch.dtype | None = None, capturable: bool = False,
        bias_lr_scale: float = 1.0,
    ) -> None:  # fmt: skip
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"SAEAdam takes a fastsae.SparseAutoencoder, got {type(sae).__name__}")
        if not (isinstance(bias_lr_scale, (int, float)) and 0 < bias_lr_scale < math.inf):
            raise ValueError(f"bias_lr_scale must be a finite number > 0, got {bias_lr_scale!r}")
        if isinstance(lr, Tensor) and (lr.dim() != 0 or not lr.is_floating_point() or lr.device != sae.W_dec.device):
            raise ValueError(
                f"a tensor lr must be a 0-dim floating tensor on the SAE's device ({sae.W_dec.device}), got a "
                f"{lr.dim()}-dim {lr.dtype} tensor on {lr.device}"
            )
        if lr < 0 or eps < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"need lr >= 0, eps >= 0 and betas in [0, 1), got lr={lr}, eps={eps}, betas={betas}")
        if capturable and state_dtype not in (None, sae.W_dec.dtype):
            raise ValueError(f"capturable=True keeps the moments in the parameters' dtype, not {state_dtype}")
        others = [p for name, p in sae.named_parameters() if name != "W_dec"]
        groups = [{"params": others, "decoder": False}, {"params": [sae.W_dec], "decoder": True}]
        defaults = dict(lr=lr, betas=betas, eps=eps, state_dtype=state_dtype, capturable=capturable)
        super().__init__(groups, {**defaults, "bias_lr_scale": float(bias_lr_scale)})
        self._biases = {id(p) for name, p in sae.named_parameters() if name in BIASES}

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, except that this optimizer keeps its own `capturable` setting (torch takes every
        group option from the saved state) and holds the loaded step counts in its form: a state saved
        with the other setting, or from before the option, resumes the same run. The saved learning
        rate is taken in this optimizer's form too: a tensor rate stays the same tensor (the one a
        captured step reads, or a scheduler fills), given the saved value. It keeps its own
        `bias_lr_scale` (states saved before the option had none)."""
        kept = [(group["capturable"], group["lr"], group["bias_lr_scale"]) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (on_device, lr, bias_lr_scale) in zip(self.param_groups, kept):
            group["capturable"], group["bias_lr_scale"] = on_device, bias_lr_scale
            if isinstance(lr, Tensor):
                group["lr"] = lr.fill_(float(group["lr"]))
            elif isinstance(group["lr"], Tensor):
                group["lr"] = float(group["lr"])
            for p in group["params"]:
                saved = self.state.get(p)
                if not saved:
                    continue
                if on_device:
                    saved["step"] = torch.as_tensor(saved["step"], dtype=torch.float32).to(p.device)
                else:
                    saved["step"] = int(saved["step"])

    @staticmethod
    def _count_step(states: list[dict]) -> None:
        """Every parameter's step count up by one: the capturable counts (tensors) in one launch, where
        an in-place add per parameter took one each."""
        counts = [state["step"] for state in states if isinstance(state["step"], Tensor)]
        if counts:
            torch._foreach_add_(counts, 1)
        for state in states:
            if not isinstance(state["step"], Tensor):
                state["step"] += 1

    def _state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            # The count on the device when capturable (fp32, as torch.optim.Adam keeps it)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if group["capturable"] else 0
            state["exp_avg"] = torch.zeros_like(p, dtype=group["state_dtype"] or p.dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["state_dtype"] or p.dtype)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            groups.append((group, params, [self._state(p, group) for p in params]))
        self._count_step([state for _, _, states in groups for state in states])
        for group, params, states in groups:
            beta1, beta2 = group["betas"]
            if group["decoder"]:
                for p, state in zip(params, states):
                    F.decoder_adam_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                                    beta1, beta2, group["eps"])  # fmt: skip
                continue
            bias_lr_scale = group["bias_lr_scale"]
            kinds: dict[tuple, list[int]] = {}  # one update per (device, dtype, whether a bias at its own rate)
            for i, p in enumerate(params):
                kinds.setdefault((p.device, p.dtype, bias_lr_scale != 1.0 and id(p) in self._biases), []).append(i)
            for (device, _, scaled_bias), members in kinds.items():
                lr = group["lr"] * bias_lr_scale if scaled_bias else group["lr"]  # (a tensor rate: one launch)
                if device.type == "cuda":
                    for i in members:
                        p, state = params[i], states[i]
                        F.adam_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], lr, beta1, beta2,
                                group["eps"])  # fmt: skip
                elif group["capturable"]:
                    torch._fused_adam_(
                        [params[i] for i in members], [params[i].grad for i in members],
                        [states[i]["exp_avg"] for i in members], [states[i]["exp_avg_sq"] for i in members], [],
                        [states[i]["step"] for i in members], lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=0.0, eps=group["eps"], amsgrad=False, maximize=False,
                    )  # fmt: skip
                else:  # (on the host: a tensor rate is read there)
                    tensors = [params[i] for i in members]
                    _adam(tensors, [p.grad for p in tensors], [states[i] for i in members], float(lr), beta1, beta2,
                          group["eps"])  # fmt: skip
        return loss


# The parameters in the activations' units, whose rate `bias_lr_scale` scales
BIASES = ("b_enc", "b_dec", "threshold")
SCALE_CHUNK_ROWS = 8192  # sample rows `activation_scale` reads at once


@torch.no_grad()
def activation_scale(sae: SparseAutoencoder, sample: Tensor) -> float:
    """The RMS per dimension of `sample` [N, d] about the SAE's b_dec, as the SAE reads it (standardised
    per token, or whitened, where it does): the scale of the values its biases add to, for SAEAdam's
    `bias_lr_scale`. Call it after `sae.initialize(sample)`, which sets b_dec. A data-parallel SAE's is
    over every replica's sample (one all-reduce), so that the replicas step alike."""
    squares = torch.zeros((), dtype=torch.float64, device=sae.b_dec.device)
    for chunk in sample.split(SCALE_CHUNK_ROWS):  # (a 65536 x 4096 sample in fp64 at once: 2 GiB)
        dtype = torch.promote_types(chunk.dtype, torch.float32)
        read = sae._to_sae_space(sae._normalized(chunk.to(sae.b_dec.device))[0])  # as the SAE reads it
        deviations = read.to(dtype) - sae.b_dec.to(dtype)
        squares += deviations.pow(2).sum(dtype=torch.float64)
    sums = torch.stack([squares, squares.new_tensor(sample.numel())])
    if sae._group is not None:
        dist.all_reduce(sums, group=sae._group)
    scale = float((sums[0] / sums[1]).sqrt())
    if not 0 < scale < math.inf:
        raise ValueError(f"the sample's scale about b_dec is {scale}: give a sample of distinct, finite activations")
    return scale


def step_with_decoder_constraint(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> None:
    """`optimizer.step()` with the decoder's unit-norm constraint: inside the step for SAEAdam, around it
    (`sae.remove_decoder_parallel_grad()` before, `sae.normalize_decoder()` after) for any other optimizer."""
    if isinstance(optimizer, SAEAdam):
        optimizer.step()
        return
    sae.remove_decoder_parallel_grad()
    optimizer.step()
    sae.normalize_decoder()


# Elements updated at once off CUDA: the update's temporaries (fp32 copies of bf16 parameters and
# gradients, the denominators) stay a few hundred MB however large the encoder (a 2^20-feature encoder at
# d = 4096 needs 48 GiB of them in fp32 at once: one H200 ran out of memory at 135 GiB before `F.adam_`).
CHUNK_ELEMENTS = 2**26


def _adam(params: list[Tensor], grads: list[Tensor], states: list[dict], lr, beta1, beta2, eps) -> None:
    """torch.optim.Adam's multi-tensor update (its `_multi_tensor_adam`, without the options SAEAdam
    leaves out), on fp32 copies of the parameters whose moments are fp32 and they are not; in batches
    of pieces of at most CHUNK_ELEMENTS in all, one after the other."""
    pieces = [
        (*part, state["step"])
        for p, g, state in zip(params, grads, states)
        for part in _pieces(p, g, state["exp_avg"], state["exp_avg_sq"])
    ]
    batch, size = [], 0
    for piece in pieces:
        if batch and size + piece[0].numel() > CHUNK_ELEMENTS:
            _adam_batch(batch, lr, beta1, beta2, eps)
            batch, size = [], 0
        batch.append(piece)
        size += piece[0].numel()
    _adam_batch(batch, lr, beta1, beta2, eps)


def _adam_batch(pieces: list[tuple], lr, beta1, beta2, eps) -> None:
    """One multi-tensor update of (parameter, gradient, exp_avg, exp_avg_sq, step) pieces."""
    params, grads, exp_avgs, exp_avg_sqs, steps = (list(column) for column in zip(*pieces))
    targets = [p if p.dtype == m.dtype else p.to(m.dtype) for p, m in zip(params, exp_avgs)]
    grads = [g if g.dtype == m.dtype else g.to(m.dtype) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_sizes = [-lr / (1 - beta1**step) for step in steps]
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [(1 - beta2**step) ** 0.5 for step in steps])
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(targets, exp_avgs, denominators, step_sizes)
    for p, target in zip(params, targets):
        if target is not p:
            p.copy_(target)


def _pieces(*tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Same-shaped tensors cut into matching flat views of at most CHUNK_ELEMENTS (whole when one of
    them is not contiguous: a view of its pieces would not be flat)."""
    if tensors[0].numel() <= CHUNK_ELEMENTS or not all(t.is_contiguous() for t in tensors):
        return [tensors]
    return list(zip(*(t.view(-1).split(CHUNK_ELEMENTS) for t in tensors)))
