"""What every launcher in fastsae/ops shares: interpreter detection, the matmul dtype, the SM count,
and a small autotuner whose candidates may change the grid and scratch sizes (triton.autotune's
configs only change constexprs)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import triton.language as tl
from torch import Tensor

# TRITON_INTERPRET=1 runs the kernels on CPU tensors with numpy (tests only); its bf16/fp16 tl.dot is
# wrong, so the launchers upcast dot operands to fp32 there.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def may_synchronize(t: Tensor) -> bool:
    """Whether code may read a value of `t` on the host: not while torch.compile traces it or a CUDA
    graph captures it (where a host read breaks the graph or fails)."""
    return not (torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


@contextlib.contextmanager
def on_stream(stream: torch.cuda.Stream) -> Iterator[None]:
    """Runs the block on `stream`, after the work queued so far on the current stream."""
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        yield


def join_stream(stream: torch.cuda.Stream, *made_there: Tensor | None) -> None:
    """The current stream waits for `stream`; the tensors made there are marked as used on the current
    stream, so the caching allocator does not hand their memory to `stream` again while it may still be
    read."""
    current = torch.cuda.current_stream(stream.device)
    current.wait_stream(stream)
    for tensor in made_there:
        if tensor is not None:
            tensor.record_stream(current)


def join_event(event: torch.cuda.Event, *made_there: Tensor | None) -> None:
    """`join_stream` up to `event` only: the current stream waits for the work queued on another stream
    before the event was recorded there, not for what was queued after it."""
    current = torch.cuda.current_stream()
    current.wait_event(event)
    for tensor in made_there:
        if tensor is not None:
            tensor.record_stream(current)


def only_asked(grads: tuple[Tensor, ...], asked: tuple[bool, ...]) -> tuple[Tensor, ...]:
    """`grads`, each replaced by an empty tensor of its dtype where not `asked` (what the backward kernels
    return for a gradient nobody asked for, rather than filling one)."""
    return tuple(grad if wanted else grad.new_empty(0) for grad, wanted in zip(grads, asked))


def matmul_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The matmul operand dtype for weights of `weight_dtype`: what a centred input is cast to before
    it meets them (fp32 under the interpreter)."""
    return torch.float32 if INTERPRET else weight_dtype


def dot_dtype(weight_dtype: torch.dtype):
    """`matmul_dtype` as the Triton dtype of tensor-core operands."""
    if weight_dtype == torch.float64:
        raise ValueError("the Triton kernels take fp32, bf16 or fp16 weights; fp64 runs the reference path")
    return TL_DTYPES[matmul_dtype(weight_dtype)]


def input_precision(weight_dtype: torch.dtype) -> str:
    """fp32 weights use TF32 tensor cores only when torch allows it (torch.set_float32_matmul_precision)."""
    if INTERPRET or weight_dtype != torch.float32:
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises the split logic
    return torch.cuda.get_device_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code. (triton.cdiv and triton.next_power_of_2 are constexpr functions in
    Triton 3.6 that cost the host about 4 us per call, and a training step makes dozens of them.)"""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host code (see `cdiv`)."""
    return 1 << max(n - 1, 0).bit_length()


def bucket(n: int) -> int:
    """Power-of-two bucket of a size, for tuning-cache keys."""
    return next_power_of_2(n)


_best: dict[tuple, object] = {}


def _timed(candidates: Sequence[object]) -> bool:
    return not (INTERPRET or os.environ.get("FASTSAE_AUTOTUNE") == "0" or len(candidates) == 1)


def needs_tuning(key: tuple, candidates: Sequence[object]) -> bool:
    """Whether `tuned(key, candidates, run)` would time the candidates now (its first call for `key`)."""
    return _timed(candidates) and key not in _best


def tuned(key: tuple, candidates: Sequence[object], run: Callable[[object], None]) -> object:
    """The fastest of `candidates` for `key`, timed once per process with `run(candidate)` (which
    launches the kernel(s) with that candidate). Under the interpreter, or with FASTSAE_AUTOTUNE=0 (the
    tests set it to bound compile time; the benchmarks tune and check the tuned result before timing
    it), the first candidate is used."""
    if not _timed(candidates):
        return candidates[0]
    if key not in _best:
        timings = [seconds_per_call(lambda c=c: run(c)) for c in candidates]
        _best[key] = candidates[timings.index(min(timings))]
    return _best[key]


def seconds_per_call(fn: Callable[[], object], calls: int = 10, rounds: int = 3) -> float:
    """Wall-clock seconds per call of `calls` back-to-back calls, the best of `rounds`, after one call
    that compiles: what a training loop sees, the host's launch time included. (triton's do_bench
    clears the L2 between calls, which lets the host catch up: on the H200 at 1024 tokens x 65536
    features it timed a filter route at 0.48 ms that takes 0.78 ms per call back to back.)"""
    fn()
    _synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _synchronize()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forget_tuned() -> None:
    """Forgets every pick, so that the next call of each op times its candidates again (`bench.ab_step
    --retune`: a switch that changes which candidate is fastest)."""
    _best.clear()


def tuned_items(*key_prefix: object) -> list[tuple[tuple, object]]:
    """(key, what the tuner picked) for every key that starts with `key_prefix` (benchmarks report it)."""
    return [(key, choice) for key, choice in _best.items() if key[: len(key_prefix)] == key_prefix]


def tuned_choices(*key_prefix: object) -> list[object]:
    """What the tuner picked for every key that starts with `key_prefix`."""
    return [choice for _, choice in tuned_items(*key_prefix)]
