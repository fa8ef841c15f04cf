"""fastsae.graphs.CapturedStep: a training step replayed as one CUDA graph trains as the eager step does,
captures again when the dead features outgrow its AuxK list (written from outside or dying in training),
replays without synchronising in steady state, and refuses what it cannot capture; a BatchTopK step,
replayed as two graphs around its codes' exactness check, trains as the eager step does too, running
eagerly the batches whose codes would not be exact."""

import warnings
from collections import deque

import pytest
import torch

import fastsae
from fastsae.graphs import CapturedStep

from .utils import assert_close


def _pair(device, dead_after_tokens=10**6, **overrides):
    """Two identical fp32 TopK SAEs with their own Adam (fused and capturable on CUDA)."""
    cfg = fastsae.SAEConfig(
        d_in=64, n_features=1024, k=8, dtype="float32", dead_after_tokens=dead_after_tokens, **overrides
    )
    x = torch.randn(512, cfg.d_in, device=device) + 2
    first = fastsae.SparseAutoencoder(cfg).to(device).initialize(x)
    second = fastsae.SparseAutoencoder(cfg).to(device)
    second.load_state_dict(first.state_dict())
    optimizers = [
        torch.optim.Adam(sae.parameters(), lr=1e-3, capturable=device == "cuda", fused=device == "cuda")
        for sae in (first, second)
    ]
    return (first, second), optimizers


def _eager_step(sae, optimizer, x):
    optimizer.zero_grad(set_to_none=True)
    out = sae(x)
    out.loss.backward()
    sae.remove_decoder_parallel_grad()
    optimizer.step()
    sae.normalize_decoder()
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("auxk_side_stream", [False, True], ids=["auxk_in_line", "auxk_side_stream"])
def test_captured_step_trains_like_the_eager_step(auxk_side_stream, monkeypatch):
    """Warm-up steps, a capture, replays, and a capture again when the dead features grow past the
    captured list (64, then 256): losses and parameters follow the eager twin's, with AuxK in line
    and on a stream of its own (F.AUXK_SIDE_STREAM: the graph records the fork and the join)."""
    monkeypatch.setattr(fastsae.functional, "AUXK_SIDE_STREAM", auxk_side_stream)
    (eager, captured), (eager_opt, captured_opt) = _pair("cuda")
    step = CapturedStep(captured, captured_opt, warmup=2)
    batches = [torch.randn(512, 64, device="cuda") + 2 for _ in range(10)]
    for i, x in enumerate(batches):
        n_dead = 10 if i < 6 else 200  # features kept dead (silent for more than dead_after_tokens)
        for sae in (eager, captured):
            with torch.no_grad():
                sae.tokens_since_fired[:n_dead] = 10**7
        want = _eager_step(eager, eager_opt, x)
        got = step(x)
        assert abs(float(got.loss) - float(want.loss)) <= 1e-4 * float(want.loss), (
            i,
            float(got.loss),
            float(want.loss),
        )
        assert abs(float(got.auxk) - float(want.auxk)) <= 1e-3 * max(float(want.auxk), 1e-6), i
        if i == 4:
            assert captured.auxk_capacity == 64 and step._graph is not None
    assert captured.auxk_capacity == 256, "the dead features outgrew the list: a new capture"
    # Atomic per-feature sums add in a different order from run to run: fp32 rounding, amplified by Adam.
    for name, p in captured.named_parameters():
        assert_close(p, dict(eager.named_parameters())[name], torch.float16, name)
    assert int(captured.n_tokens_seen) == int(eager.n_tokens_seen) == 10 * 512


def _step_alike(eager, eager_opt, step, x, i):
    """An eager SAEAdam step of `eager` and a call of the captured `step` on the same batch: the same loss."""
    eager_opt.zero_grad(set_to_none=True)
    want = eager(x)
    want.loss.backward()
    eager_opt.step()
    got = step(x)
    assert abs(float(got.loss) - float(want.loss)) <= 1e-4 * float(want.loss), (i, float(got.loss))


@pytest.mark.gpu
@pytest.mark.parametrize("widths", [(), (128, 512)], ids=["plain", "matryoshka"])
def test_captured_step_with_the_fused_optimizer(widths):
    """SAEAdam(capturable=True): the captured step (the decoder constraint inside the optimizer's step)
    follows eager steps of the default SAEAdam, through warm-up, capture and replays; also a Matryoshka
    SAE's, whose prefixes' decodes the graph holds too."""
    (eager, captured), _ = _pair("cuda", matryoshka_widths=widths)
    eager_opt = fastsae.optim.SAEAdam(eager, lr=1e-3)
    step = CapturedStep(captured, fastsae.optim.SAEAdam(captured, lr=1e-3, capturable=True), warmup=2)
    for i in range(8):
        x = torch.randn(512, 64, device="cuda") + 2
        for sae in (eager, captured):
            with torch.no_grad():
                sae.tokens_since_fired[:10] = 10**7
        _step_alike(eager, eager_opt, step, x, i)
    assert step._graph is not None
    for name, p in captured.named_parameters():
        assert_close(p, dict(eager.named_parameters())[name], torch.float16, name)
    norms = captured.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5), "the decoder rows stay unit-norm"


@pytest.mark.gpu
@pytest.mark.parametrize("rate", ["tensor", "number"])
def test_captured_step_follows_a_learning_rate_schedule(rate):
    """A LambdaLR schedule (warm-up, then decay) over SAEAdam's rate: as a tensor the replays read it and
    no capture follows the first; as a number every change captures the step again, with one warning.
    Either way the losses and parameters follow eager steps under the same schedule."""
    (eager, captured), _ = _pair("cuda")
    eager_opt = fastsae.optim.SAEAdam(eager, lr=1e-3)
    lr = torch.tensor(1e-3, device="cuda") if rate == "tensor" else 1e-3
    captured_opt = fastsae.optim.SAEAdam(captured, lr=lr, capturable=True)
    step = CapturedStep(captured, captured_opt, warmup=1)
    captures = []
    capture = step._capture
    step._capture = lambda x: (captures.append(1), capture(x))

    def factor(i):
        return min(i + 1, 4) / 4 * 0.8 ** max(0, i - 4)

    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (eager_opt, captured_opt)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(9):
            _step_alike(eager, eager_opt, step, torch.randn(512, 64, device="cuda") + 2, i)
            for schedule in schedules:
                schedule.step()
    recaptures = [w for w in caught if "changed since the step was captured" in str(w.message)]
    if rate == "tensor":
        assert len(captures) == 1 and not recaptures
    else:  # the rate changes after every step: each capture is replaced by an eager step and a capture
        assert len(captures) > 1 and len(recaptures) == 1
    for name, p in captured.named_parameters():
        assert_close(p, dict(eager.named_parameters())[name], torch.float16, name)


def test_captured_step_notices_its_optimizers_numbers_change():
    """What a capture fixes: the optimizer groups' numbers (a change asks for a new capture, warned about
    once), not its tensors (a tensor rate, which the graph reads)."""
    cfg = fastsae.SAEConfig(d_in=8, n_features=64, k=4, dtype="float32")
    sae = fastsae.SparseAutoencoder(cfg)
    rate = torch.tensor(1e-3)
    step = object.__new__(CapturedStep)  # its decisions alone: no graph, no CUDA
    step.optimizer = fastsae.optim.SAEAdam(sae, lr=rate)
    step._recaptured_for_numbers = False
    step._captured_numbers = step._optimizer_numbers()
    rate.fill_(5e-4)
    assert not step._optimizer_numbers_changed(), "a tensor rate is read at every replay"
    step.optimizer.param_groups[0]["betas"] = (0.8, 0.999)
    with pytest.warns(UserWarning, match="optimizer's betas changed since the step was captured"):
        assert step._optimizer_numbers_changed()
    step._captured_numbers = step._optimizer_numbers()
    assert not step._optimizer_numbers_changed()
    step.optimizer.param_groups[1]["lr"] = 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (warned once only)
        assert step._optimizer_numbers_changed()


@pytest.mark.gpu
def test_captured_step_follows_features_dying_in_training():
    """300 features that cannot fire die after 5 batches, through the statistics the step itself
    updates: the bounds the replays copy back grow the AuxK list before they die, and every step's
    losses follow the eager twin's."""
    (eager, captured), (eager_opt, captured_opt) = _pair("cuda", dead_after_tokens=4 * 512)
    with torch.no_grad():
        for sae in (eager, captured):
            sae.b_enc[:300] = -1e3
    step = CapturedStep(captured, captured_opt, warmup=1)
    for i in range(12):
        x = torch.randn(512, 64, device="cuda") + 2
        n_dead = int(captured.dead_features().sum())  # what this step's AuxK sees
        want = _eager_step(eager, eager_opt, x)
        got = step(x)
        if step._graph is not None and captured.auxk_capacity is not None:
            assert n_dead <= captured.auxk_capacity, (i, n_dead, captured.auxk_capacity)
        assert abs(float(got.loss) - float(want.loss)) <= 1e-4 * float(want.loss), i
        assert abs(float(got.auxk) - float(want.auxk)) <= 1e-3 * max(float(want.auxk), 1e-6), i
    assert int(captured.dead_features().sum()) >= 300
    assert step._graph is not None and captured.auxk_capacity >= 300


@pytest.mark.gpu
def test_captured_step_replays_without_synchronising():
    """From the third replay on, the host reads the dead-count bound of two replays back: no call
    waits on the GPU (torch's sync debug mode raises on any synchronising call)."""
    (sae, _), (optimizer, _) = _pair("cuda", check_finite=False)
    step = CapturedStep(sae, optimizer, warmup=1)
    batches = [torch.randn(512, 64, device="cuda") + 2 for _ in range(8)]
    for x in batches[:4]:  # an eager step, the capture and two replays, whose bounds come back
        step(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in batches[4:]:
            step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step._graph is not None


@pytest.mark.gpu
@pytest.mark.parametrize("threshold_first", [False, True], ids=["candidates", "threshold_first"])
def test_captured_batchtopk_step_trains_like_the_eager_step(threshold_first, monkeypatch):
    """A BatchTopK SAE's captured step (two graphs, split at the sparse codes' exactness check, by each
    sparse route) follows its eager twin; a batch with a row that keeps more codes than the codes'
    width runs eagerly instead of the second graph, and the replays after it follow the twin too."""
    monkeypatch.setattr(fastsae.ops.batchtopk, "THRESHOLD_FIRST", threshold_first)
    (eager, captured), (eager_opt, captured_opt) = _pair("cuda", activation="batchtopk")
    for group in (*eager_opt.param_groups, *captured_opt.param_groups):
        group["lr"] = 1e-4  # each batch's threshold within the threshold-first route's margin of the last's
    step = CapturedStep(captured, captured_opt, warmup=2)
    for i in range(10):
        # Rows of one norm keep about k codes each; at the Gaussian rows' spread of norms (d = 64) a batch
        # often has a row that keeps more than 4k = 32, which takes the eager step.
        x = torch.randn(512, 64, device="cuda")
        x = 8 * x / x.norm(dim=1, keepdim=True) + 2
        hot = i == 6
        if hot:  # this row's codes outrank every other row's: it keeps far more than 4k of them
            x[0] *= 50
        estimate = float(captured.last_batch_threshold)
        want = _eager_step(eager, eager_opt, x)
        fallbacks = step.eager_fallbacks
        got = step(x)
        assert abs(float(got.loss) - float(want.loss)) <= 1e-4 * float(want.loss), (i, float(got.loss))
        if i >= 2:  # replays: the second graph, or, for the hot batch, an eager step
            threshold = float(eager.last_batch_threshold)
            assert step._rest is not None and step.eager_fallbacks == fallbacks + hot, (i, estimate, threshold)
            width = 4 * captured.cfg.k  # the captured codes' width; the exact routes' are as wide as needed
            assert (got.vals.shape[-1] > width) == hot, (i, got.vals.shape)
    for name, p in captured.named_parameters():
        assert_close(p, dict(eager.named_parameters())[name], torch.float16, name)
    assert float(captured.batchtopk_threshold) == pytest.approx(float(eager.batchtopk_threshold), rel=1e-4)


class _FinishedEvent:
    """Stands for a CUDA event whose copy is done (the host-side decisions run on CPU)."""

    def synchronize(self):
        pass


def test_captured_step_decides_the_auxk_list_from_the_bound_or_the_count(monkeypatch):
    """The host's decision before a replay, on CPU: with two replays' bounds and statistics untouched
    since, the older bound keeps the captured list without counting; a bound above the list, no
    bounds, or statistics written from outside make it count (the list grows to the count and a
    quarter, rounded up to a multiple of 64, or a power of two that is shorter and leaves 64 to spare,
    when the count outgrows it), and so does a bound of a quarter of the list or less, where a new list
    is shorter."""
    cfg = fastsae.SAEConfig(d_in=8, n_features=2048, k=4, dtype="float32", dead_after_tokens=1000)
    sae = fastsae.SparseAutoencoder(cfg)
    sae.auxk_capacity = 64
    step = object.__new__(CapturedStep)  # its decisions alone: no graph, no CUDA
    step.sae, step._dead_bounds, step._stats_version = sae, deque(), -1
    counted = []
    real_dead_features = sae.dead_features
    monkeypatch.setattr(sae, "dead_features", lambda: counted.append(1) or real_dead_features())
    with torch.no_grad():
        sae.tokens_since_fired[:10] = 2000  # 10 dead features
    assert step._auxk_capacity(100) == 64 and len(counted) == 1, "no bounds yet: counted"

    def replayed(*bounds):  # as _copy_dead_bound leaves them after two replays
        step._dead_bounds = deque((_FinishedEvent(), torch.tensor(b, dtype=torch.int32)) for b in bounds)
        step._stats_version = sae.tokens_since_fired._version

    replayed(50, 999)
    assert step._auxk_capacity(100) == 64 and len(counted) == 1, "the older bound holds: no count"
    replayed(80, 0)
    assert step._auxk_capacity(100) == 64 and len(counted) == 2, "bound above the list: counted, 10 fit"
    replayed(50, 50)
    with torch.no_grad():
        sae.tokens_since_fired[:100] = 2000  # written from outside: 100 dead, more than the bound says
    assert step._auxk_capacity(100) == 128 and len(counted) == 3, "statistics written: counted, the list grows"
    with torch.no_grad():
        sae.tokens_since_fired[:150] = 2000  # 150 + 38 = 188: three multiples of 64, where a power of two is 256
    assert step._auxk_capacity(100) == 192, "the count and a quarter, rounded up to a multiple of 64"
    with torch.no_grad():
        sae.tokens_since_fired[:832] = 2000  # 832 + 208 = 1040 -> 1088, where 1024 holds 832 + 64
    assert step._auxk_capacity(100) == 1024, "a power of two that leaves 64 to spare, where shorter"
    with torch.no_grad():
        sae.tokens_since_fired[:1000] = 2000  # 1024 would leave 24: 1000 + 250 -> 1280
    assert step._auxk_capacity(100) == 1280, "no power of two leaves room below the rounded count"
    assert not step._dead_bounds

    # Features revive: a list four times the dead features or longer gives way to a new one.
    sae.auxk_capacity = 1280  # (as the capture of that list leaves it)
    with torch.no_grad():
        sae.tokens_since_fired.zero_()
        sae.tokens_since_fired[:321] = 2000
    replayed(321, 321)
    assert step._auxk_capacity(100) == 1280 and len(counted) == 6, "more than a quarter of the list: kept"
    with torch.no_grad():
        sae.tokens_since_fired[300:] = 0  # 300 dead: 300 + 75 -> 384
    replayed(320, 320)
    assert step._auxk_capacity(100) == 384 and len(counted) == 7, "a quarter of the list or fewer: counted, shorter"
    sae.auxk_capacity = 64
    with torch.no_grad():
        sae.tokens_since_fired.zero_()
    replayed(0, 0)
    assert step._auxk_capacity(100) == 64 and len(counted) == 7, "the shortest list: kept, no count"


@pytest.mark.gpu
def test_captured_step_checks_its_input():
    (sae, _), (optimizer, _) = _pair("cuda")
    step = CapturedStep(sae, optimizer, warmup=1)
    step(torch.randn(512, 64, device="cuda"))
    step(torch.randn(512, 64, device="cuda"))  # captured
    with pytest.raises(ValueError, match="make one CapturedStep per batch shape"):
        step(torch.randn(256, 64, device="cuda"))
    with pytest.raises(ValueError, match="NaN"):
        step(torch.full((512, 64), float("nan"), device="cuda"))


def test_captured_step_refuses_what_it_cannot_capture():
    (sae, _), (optimizer, _) = _pair("cpu")
    with pytest.raises(ValueError, match="SAEAdam cannot be captured"):
        CapturedStep(sae, fastsae.optim.SAEAdam(sae))
    with pytest.raises(ValueError, match="Adam cannot be captured"):
        CapturedStep(sae, torch.optim.Adam(sae.parameters()))
    with pytest.raises(ValueError, match="Adam cannot be captured"):  # torch refuses fused Adam under capture too
        CapturedStep(sae, torch.optim.Adam(sae.parameters(), fused=True))
    with pytest.raises(ValueError, match="move the SAE to a GPU"):
        CapturedStep(sae, torch.optim.Adam(sae.parameters(), capturable=True))
    with pytest.raises(TypeError, match="SparseAutoencoder"):
        CapturedStep(torch.nn.Linear(2, 2), optimizer)
