"""`CapturedStep`: a whole SAE training step (forward, backward, decoder constraint, optimizer step)
replayed as one CUDA graph, so the host launches one graph per step instead of a few hundred kernels.

    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4, fused=True, capturable=True)
    step = fastsae.graphs.CapturedStep(sae, optimizer)
    for x in batches:                      # CUDA tensors of one shape
        out = step(x)                      # out.loss, out.fvu, ... (the graph's own tensors: read or copy
                                           # them before the next call, which overwrites them)

The first `warmup` calls run eagerly (on a side stream, as torch.cuda.graphs asks: they tune the
kernels and settle the allocator) and train as usual; the next one captures the step and replays it
from then on. A captured step cannot count dead features on the host, so AuxK reads a dead-feature
list of fixed length (`SparseAutoencoder.auxk_capacity`, the current count and a quarter, rounded up,
or a power of two if that is shorter and leaves room;
while tokens x that length is at most sae.AUXK_DENSE_MAX_ELEMENTS, else the fused AuxK stream), and
the step captures again, after one eager step, when the list would be too short, or when the dead
features have fallen to a quarter of it (sae.AUXK_SHRINK) and a new list would be shorter.

Deciding that needs no synchronisation in steady state, so the host queues the next replay while the
GPU runs this one. A feature's tokens-since-fired grows by at most one batch per step, so the features
within two batches of the dead threshold at the end of step t bound the dead features that step t + 2
sees. Each replay computes that bound into its own memory, and an asynchronous copy brings it to
pinned host memory. Before step t + 2 the host reads the copy of step t, finished by then while step
t + 1 runs. The host counts the dead features instead, with one synchronisation, in three cases:
- the bound exceeds the list (features near death: the count decides), or is low enough that the
  list would shrink (the count decides how far);
- there is no such copy yet (the first replays after a capture);
- something else wrote the statistics since (an eager step, `reset_death_stats`, `load_state_dict`:
  the tensor's version counter tells).
With cfg.check_finite the input's check synchronises at every step; turn it off where the data is
known finite for a step that never waits on the GPU.

A data-parallel TopK SAE (`sae.data_parallel()`) is captured too, each rank its own graph, without
DistributedDataParallel (whose buckets and host-side bookkeeping cannot be captured; CapturedStep takes
the SAE itself): the step all-reduces each gradient as soon as the backward has accumulated it and
averages it over the replicas (`fastsae.parallel.averaging_gradients`), the forward's collectives (death
statistics, loss normalisation) are captured with it, and the death statistics are the same on every
rank, so every rank decides the same captures and the collectives stay paired.

The optimizer: torch.optim.Adam / AdamW with `capturable=True` (torch refuses any other optimizer under
capture, fused or not), fastest with `fused=True` as well, between the decoder constraint's two calls;
or `fastsae.optim.SAEAdam(sae, capturable=True)`, whose step applies the constraint in its own pass
over W_dec (the captured step then leaves out the two calls, each a pass over W_dec-sized tensors).

A learning-rate schedule reaches the replays through a rate the graph reads: give the optimizer lr
as a 0-dim tensor on the GPU (`SAEAdam(sae, lr=torch.tensor(2e-4, device="cuda"), capturable=True)`,
or torch's Adam with `fused=True, capturable=True` and such a tensor), which torch's schedulers fill in
place. A number is part of the graph; where one of the optimizer's numbers (its lr, betas, ...) changes
between calls, the step is captured again (one eager step, then a capture), with a warning the first
time, so that it trains at the new value.

A BatchTopK SAE trains on its sparse codes in the graph too (`fastsae/ops/batchtopk.py`). Their
selection is exact unless a row keeps more codes than the codes' fixed width, which its check finds on
the device, and a graph cannot wait for that check. So the step is captured as two graphs that share one
memory pool: the first ends at the check (nothing the step writes, parameters, optimizer state or
statistics, is written before it), the second holds the rest. A replay runs the first, reads the flag
(one synchronisation a step), then runs the second, or, where the codes would not be exact, runs the
step eagerly instead (the exact routes, dense codes where needed; `eager_fallbacks` counts those steps).

Not covered yet: feature-sharded SAEs, and data-parallel SAEs other than TopK (BatchTopK's selection
over the replicas synchronises).
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections import deque

import torch
from torch import Tensor

from . import parallel
from .ops import batchtopk as batchtopk_ops
from .ops.launch import join_stream, on_stream
from .optim import step_with_decoder_constraint
from .sae import SAEOutput, SparseAutoencoder, auxk_list_keeps, auxk_list_length

# Steps between the statistics a dead-count bound is computed from and the step it is used for: the
# host reads replay t's bound before launching step t + 2, while replay t + 1 runs.
BOUND_LOOKAHEAD_STEPS = 2


class CapturedStep:
    """Call with a batch [..., d] (the same shape every call) to train `sae` one step with `optimizer`;
    returns the step's SAEOutput (see the module docstring)."""

    def __init__(self, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, warmup: int = 3) -> None:
        if not isinstance(sae, SparseAutoencoder):
            raise TypeError(f"CapturedStep takes a fastsae.SparseAutoencoder, got {type(sae).__name__}")
        if not all(group.get("capturable") for group in optimizer.param_groups):
            raise ValueError(
                f"{type(optimizer).__name__} cannot be captured: its step count lives on the host (use "
                "fastsae.optim.SAEAdam, or torch.optim.Adam or AdamW with fused=True, with capturable=True)"
            )
        if sae._feature_group is not None:
            raise ValueError("CapturedStep does not capture feature-sharded SAEs yet")
        if sae._group is not None and sae.cfg.activation != "topk":
            raise ValueError(f"CapturedStep captures data-parallel TopK SAEs only, not {sae.cfg.activation!r}")
        if not sae.W_enc.is_cuda:
            raise ValueError("CapturedStep captures CUDA graphs: move the SAE to a GPU first")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (kernels are tuned and the allocator settled first), got {warmup}")
        self.sae, self.optimizer = sae, optimizer
        self._eager_left = warmup
        self._graph: torch.cuda.CUDAGraph | None = None
        # A BatchTopK step's second graph (the step after its codes' exactness check, which ends the first)
        # and that check's flag, True where the codes would not be exact
        self._rest: torch.cuda.CUDAGraph | None = None
        self._static_inexact: Tensor | None = None
        self.eager_fallbacks = 0  # replays whose BatchTopK codes were not exact: those steps ran eagerly
        self._static_x: Tensor | None = None
        self._static_out: SAEOutput | None = None
        self._static_dead_bound: Tensor | None = None  # the captured step's bound on the dead count
        # (event, pinned host copy) of the last two replays' bounds, oldest first, and the statistics'
        # version counter after the last replay (replays do not bump it; any other write does)
        self._dead_bounds: deque[tuple[torch.cuda.Event, Tensor]] = deque()
        self._stats_version = -1
        self._captured_numbers: list[dict] | None = None  # the optimizer's numbers in the graph
        self._recaptured_for_numbers = False  # (warned about it)

    def __call__(self, x: Tensor) -> SAEOutput:
        sae = self.sae
        if not sae.training:
            raise ValueError("CapturedStep trains the SAE: call sae.train() first")
        if self._static_x is not None and (x.shape != self._static_x.shape or x.dtype != self._static_x.dtype):
            raise ValueError(
                f"x is {tuple(x.shape)} {x.dtype}, but the captured step takes "
                f"{tuple(self._static_x.shape)} {self._static_x.dtype} (make one CapturedStep per batch shape)"
            )
        n_tokens = x.numel() // sae.cfg.d_in
        capacity = self._auxk_capacity(n_tokens)
        # A graph whose dead-feature list no longer fits, or that holds the optimizer's old numbers: one
        # eager step, then a capture
        if self._graph is not None and (capacity != sae.auxk_capacity or self._optimizer_numbers_changed()):
            self._graph = None
            self._eager_left = 1
        if self._graph is None and self._eager_left > 0:
            self._eager_left -= 1
            return self._eager_step(x)
        sae._check_input(x)  # the module's own checks, which skip the finiteness one inside the graph
        if self._graph is None:
            sae.auxk_capacity = capacity
            self._capture(x)
        self._static_x.copy_(x)
        self._graph.replay()
        if self._rest is not None:
            if bool(self._static_inexact):  # one synchronisation; nothing the step writes is written yet
                self.eager_fallbacks += 1
                return self._fallback_step(x)
            self._rest.replay()
        self._copy_dead_bound()
        return self._static_out

    def _optimizer_numbers(self) -> list[dict]:
        """Each optimizer group's settings that a capture fixes: all but its parameters and its tensors
        (a tensor rate is read by the graph at every replay)."""
        return [
            {key: value for key, value in group.items() if key != "params" and not isinstance(value, Tensor)}
            for group in self.optimizer.param_groups
        ]

    def _optimizer_numbers_changed(self) -> bool:
        """Whether the optimizer's numbers differ from those the graph was captured with (warning, the
        first time, that each change costs a capture)."""
        numbers = self._optimizer_numbers()
        if numbers == self._captured_numbers:
            return False
        if not self._recaptured_for_numbers:
            changed = sorted({key for now, then in zip(numbers, self._captured_numbers) for key in now
                              if now[key] != then.get(key)})  # fmt: skip
            warnings.warn(
                f"the optimizer's {', '.join(changed)} changed since the step was captured: capturing it again "
                "(one eager step and a capture each time). For a schedule, give the optimizer lr as a 0-dim "
                "tensor on the GPU, which the graph reads at every replay",
                stacklevel=3,
            )
            self._recaptured_for_numbers = True
        return True

    def _auxk_capacity(self, n_tokens: int) -> int | None:
        """The dead-feature list length the next step needs: the captured one while the dead features fit
        it, else a longer one (AUXK_HEADROOM), capped where tokens x length reaches AUXK_DENSE_MAX_ELEMENTS;
        None (the fused AuxK stream) where the dead features are more than that, as in an eager step."""
        sae = self.sae
        if not self._uses_auxk():
            return None
        capacity = sae.auxk_capacity
        if capacity is not None:
            bound = self._dead_count_bound()
            if bound is not None and auxk_list_keeps(bound, capacity, n_tokens, sae.cfg.n_features):
                return capacity  # the list holds them and is not too long, known without a synchronisation
        n_dead = int(sae.dead_features().sum())  # one synchronisation
        return auxk_list_length(n_dead, capacity, n_tokens, sae.cfg.n_features)

    def _uses_auxk(self) -> bool:
        return self.sae.cfg.activation == "topk" and bool(self.sae.cfg.k_aux)

    def _dead_count_bound(self) -> int | None:
        """At least the number of dead features the next step's AuxK sees: the bound replay t - 1
        copied; None when there is none, or the statistics were written outside the replays since."""
        if self.sae.tokens_since_fired._version != self._stats_version:
            self._dead_bounds.clear()
        if len(self._dead_bounds) < BOUND_LOOKAHEAD_STEPS:
            return None
        event, host = self._dead_bounds[0]
        event.synchronize()  # done long ago in steady state: the GPU is running the replay after it
        return int(host)

    def _copy_dead_bound(self) -> None:
        """Queue the copy of this replay's dead-count bound to pinned host memory, reusing the oldest
        copy's buffer once the host has read it."""
        if self._static_dead_bound is None:
            return
        if len(self._dead_bounds) == BOUND_LOOKAHEAD_STEPS:
            event, host = self._dead_bounds.popleft()
        else:
            event, host = torch.cuda.Event(), torch.empty((), dtype=torch.int32, pin_memory=True)
        host.copy_(self._static_dead_bound, non_blocking=True)
        event.record()
        self._dead_bounds.append((event, host))
        self._stats_version = self.sae.tokens_since_fired._version

    def _train(self, x: Tensor, bound_stream: torch.cuda.Stream | None = None) -> SAEOutput:
        """One step; with `bound_stream` (while capturing), the dead-count bound on that stream beside the
        backward, once the forward has updated the statistics it reads."""
        sae = self.sae
        out = sae(x)
        if bound_stream is not None:
            with on_stream(bound_stream):
                n_tokens = x.numel() // sae.cfg.d_in
                reach = sae.cfg.dead_after_tokens - BOUND_LOOKAHEAD_STEPS * n_tokens
                self._static_dead_bound = (sae.tokens_since_fired > reach).sum(dtype=torch.int32)
        if sae._group is None:
            averaged = contextlib.nullcontext()
        else:  # the replicas' mean gradient, as DistributedDataParallel would leave it
            averaged = parallel.averaging_gradients(list(sae.parameters()), sae._group)
        with averaged:
            out.loss.backward()
        step_with_decoder_constraint(sae, self.optimizer)
        if bound_stream is not None:
            join_stream(bound_stream, self._static_dead_bound)
        return out

    def _eager_step(self, x: Tensor) -> SAEOutput:
        """A step outside the graph, on a side stream (torch.cuda.graphs' warm-up pattern)."""
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            out = self._train(x)
        torch.cuda.current_stream(x.device).wait_stream(side)
        return out

    def _fallback_step(self, x: Tensor) -> SAEOutput:
        """An eager step in place of a replay, leaving the graph's gradient tensors in place (the replays
        write them at their addresses; the eager step's own gradients are dropped afterwards)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        static_grads = [p.grad for p in params]
        out = self._eager_step(x)
        for param, grad in zip(params, static_grads):
            param.grad = grad
        return out

    def _capture(self, x: Tensor) -> None:
        """Captures the step as one graph, or, where a BatchTopK step's codes check their exactness
        (`batchtopk_ops.exact`), as two: the first ends at the check (`_split`), the second (sharing the
        first's memory pool) holds the rest. torch.cuda.graph cannot end a capture inside its block,
        so this does what it does around capture_begin and capture_end."""
        # Gradients are None when capture starts, so the captured backward writes (not accumulates) them
        # into the graph's own memory, the same addresses at every replay.
        self.optimizer.zero_grad(set_to_none=True)
        self._static_x = x.clone()
        self._captured_numbers = self._optimizer_numbers()
        _create_backward_cublas_handle(x.device)
        self._graph, self._rest, self._static_inexact = torch.cuda.CUDAGraph(), None, None
        # features this step's statistics leave within reach of death, counted beside the backward
        bound_stream = torch.cuda.Stream(x.device) if self._uses_auxk() else None
        torch.cuda.synchronize(x.device)
        gc.collect()
        torch.cuda.empty_cache()
        capture_stream = torch.cuda.Stream(x.device)
        capture_stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(capture_stream):
            self._graph.capture_begin()
            try:
                with batchtopk_ops.exactness_checkpoint(self._split):
                    self._static_out = self._train(self._static_x, bound_stream)
            except BaseException:
                with contextlib.suppress(RuntimeError):  # the capture's own error is the one to raise
                    self._capturing().capture_end()
                self._graph = self._rest = None
                raise
            self._capturing().capture_end()
        torch.cuda.current_stream(x.device).wait_stream(capture_stream)
        self._dead_bounds.clear()

    def _capturing(self) -> torch.cuda.CUDAGraph:
        return self._graph if self._rest is None else self._rest

    def _split(self, inexact: Tensor) -> None:
        """The BatchTopK codes' exactness check, reached while capturing: the first graph ends here, and
        the rest of the step is captured as the second."""
        if self._rest is not None:
            raise RuntimeError("a captured step checks the exactness of its BatchTopK codes once")
        self._static_inexact = inexact
        self._graph.capture_end()
        self._rest = torch.cuda.CUDAGraph()
        self._rest.capture_begin(pool=self._graph.pool())


def _create_backward_cublas_handle(device: torch.device) -> None:
    """A product in a backward pass, so that autograd's thread for `device` has created its cuBLAS handle:
    cuBLAS cannot create one inside a capture, and the eager steps before it need not have run a product
    in their backward (the captured step's AuxK list is a product over dead features that an eager step
    with none skips)."""
    weight = torch.ones(1, 1, device=device, requires_grad=True)
    (weight @ weight).sum().backward()
