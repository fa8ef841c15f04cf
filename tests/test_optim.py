"""fastsae.optim.SAEAdam against what it replaces: torch.optim.Adam with the decoder constraint's two
calls around its step (remove_decoder_parallel_grad, normalize_decoder)."""

import io

import pytest
import torch

import fastsae
from fastsae.optim import SAEAdam

D, N_FEATURES, K = 12, 48, 4


def _pair(dtype="float64"):
    """Two identical SAEs (TopK with AuxK, centred on the same sample)."""
    cfg = fastsae.SAEConfig(d_in=D, n_features=N_FEATURES, k=K, k_aux=6, dtype=dtype, dead_after_tokens=20)
    torch.manual_seed(0)
    sample = torch.randn(64, D, dtype=torch.float64) + 3
    first = fastsae.SparseAutoencoder(cfg).initialize(sample.to(getattr(torch, dtype)))
    second = fastsae.SparseAutoencoder(cfg)
    second.load_state_dict(first.state_dict())
    return first, second


def _batches(n, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(32, D, generator=generator, dtype=torch.float64) + 3).to(dtype) for _ in range(n)]


@pytest.mark.parametrize("chunk", [None, 100], ids=["whole", "in_pieces"])
def test_matches_torch_adam_with_the_decoder_constraint(chunk, monkeypatch):
    """Eight steps (AuxK runs once features die): every parameter, moment and loss as torch.optim.Adam
    (multi-tensor) between remove_decoder_parallel_grad and normalize_decoder, to fp64 rounding; also
    with the encoder updated in pieces (as large encoders are) of a size that leaves a remainder."""
    if chunk is not None:
        monkeypatch.setattr(fastsae.optim, "CHUNK_ELEMENTS", chunk)
    fused, plain = _pair()
    sae_adam, torch_adam = SAEAdam(fused, lr=1e-2), torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=True)
    auxk = []
    for x in _batches(8):
        out, want = fused(x), plain(x)
        assert float(out.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-10)
        auxk.append(float(want.auxk.detach()))
        out.loss.backward()
        sae_adam.step()
        sae_adam.zero_grad()
        want.loss.backward()
        plain.remove_decoder_parallel_grad()
        torch_adam.step()
        torch_adam.zero_grad()
        plain.normalize_decoder()
    assert any(value > 0 for value in auxk), "AuxK never ran"
    for (name, got), want in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sae_adam.state[got][moment], torch_adam.state[want][moment], rtol=1e-9,
                                       atol=1e-14, msg=f"{name} {moment}")  # fmt: skip


@pytest.mark.parametrize("chunk", [None, 100], ids=["whole", "in_pieces"])
def test_fp32_moments_for_bf16_parameters(chunk, monkeypatch):
    """state_dtype=float32: fp32 moments, and each bf16 parameter (but W_dec) is Adam's update of its
    value computed in fp32, rounded once to bf16 (also when updated in pieces)."""
    updated_at_once = []  # elements of each multi-tensor update: at most the chunk
    if chunk is not None:
        monkeypatch.setattr(fastsae.optim, "CHUNK_ELEMENTS", chunk)
        sqrt = torch._foreach_sqrt
        monkeypatch.setattr(
            torch, "_foreach_sqrt", lambda ts: updated_at_once.append(sum(t.numel() for t in ts)) or sqrt(ts)
        )
    sae, _ = _pair("bfloat16")
    optimizer = SAEAdam(sae, lr=1e-2, state_dtype=torch.float32)
    for step, x in enumerate(_batches(3, torch.bfloat16), 1):
        sae(x).loss.backward()
        expected = {}
        for name, p in sae.named_parameters():
            state = optimizer.state[p]
            m0 = state["exp_avg"] if state else torch.zeros_like(p, dtype=torch.float32)
            v0 = state["exp_avg_sq"] if state else torch.zeros_like(p, dtype=torch.float32)
            g = p.grad.float()
            m, v = m0.lerp(g, 0.1), 0.999 * v0 + 0.001 * g * g
            update = 1e-2 / (1 - 0.9**step) * m / (v.sqrt() / (1 - 0.999**step) ** 0.5 + 1e-8)
            expected[name] = (p.float() - update).to(torch.bfloat16)
        optimizer.step()
        optimizer.zero_grad()
        for name, p in sae.named_parameters():
            assert optimizer.state[p]["exp_avg"].dtype == torch.float32
            if name != "W_dec":  # fp32 arithmetic in another order: at most one bf16 rounding step apart
                torch.testing.assert_close(p, expected[name], rtol=2**-7, atol=0, msg=name)
    if chunk is not None:
        assert len(updated_at_once) > 3 and max(updated_at_once) <= chunk, updated_at_once


def test_state_dict_resumes_the_same_run():
    first, second = _pair()
    optimizer = SAEAdam(first, lr=1e-2)
    batches = _batches(4)
    for x in batches[:2]:
        first(x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    second.load_state_dict(first.state_dict())
    resumed = SAEAdam(second, lr=1e-2)
    checkpoint = io.BytesIO()  # as a resumed run reads it: not sharing the first optimizer's tensors
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
    for x in batches[2:]:
        for sae, opt in ((first, optimizer), (second, resumed)):
            sae(x).loss.backward()
            opt.step()
            opt.zero_grad()
    for got, want in zip(second.parameters(), first.parameters()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_capturable_steps_like_the_default(dtype):
    """capturable=True (step counts on the device, torch's fused Adam kernel for the encoder and biases,
    the decoder's bias corrections computed from the count tensor in fp32 as torch's capturable Adam
    computes them) trains like the default; its state dict loads into either kind and resumes."""
    first, second = _pair(dtype)
    default, capturable = SAEAdam(first, lr=1e-2), SAEAdam(second, lr=1e-2, capturable=True)
    batches = _batches(6, getattr(torch, dtype))
    for x in batches[:4]:
        for sae, optimizer in ((first, default), (second, capturable)):
            sae(x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(isinstance(state["step"], torch.Tensor) for state in capturable.state.values())
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == "float64" else dict(rtol=2**-6, atol=1e-3)  # fp32 counts
    for (name, got), want in zip(second.named_parameters(), first.parameters()):
        torch.testing.assert_close(got, want, **tolerance, msg=name)
    resumed = SAEAdam(first, lr=1e-2)  # the capturable state into a default optimizer, and back
    resumed.load_state_dict(capturable.state_dict())
    assert all(isinstance(state["step"], int) for state in resumed.state.values())
    again = SAEAdam(second, lr=1e-2, capturable=True)
    again.load_state_dict(resumed.state_dict())
    assert all(float(state["step"]) == 4 for state in again.state.values())
    for x in batches[4:]:
        second(x).loss.backward()
        again.step()
        again.zero_grad()
    assert all(float(state["step"]) == 6 for state in again.state.values())


def _step_both(fused, sae_adam, plain, torch_adam, x) -> None:
    """One step of each: SAEAdam's, and torch Adam's between the decoder constraint's two calls."""
    fused(x).loss.backward()
    sae_adam.step()
    sae_adam.zero_grad()
    plain(x).loss.backward()
    plain.remove_decoder_parallel_grad()
    torch_adam.step()
    torch_adam.zero_grad()
    plain.normalize_decoder()


def _warmup_then_decay(step: int) -> float:
    """A schedule's factor of the rate: up over three steps, then down."""
    return min(step + 1, 3) / 3 * 0.7 ** max(0, step - 3)


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
def test_a_tensor_rate_follows_its_scheduler_as_torch_adams_rate(capturable):
    """lr as a 0-dim tensor, changed in place by torch's LambdaLR: eight steps as torch.optim.Adam with a
    number and the same schedule, between the decoder constraint's two calls, to fp64 rounding (the
    capturable one, whose counts are fp32 tensors, to theirs). Its state dict resumes into a tensor rate
    that stays the same tensor, with the saved value."""
    fused, plain = _pair()
    rate = torch.tensor(1e-2, dtype=torch.float64)
    sae_adam = SAEAdam(fused, lr=rate, capturable=capturable)
    torch_adam = torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=True)
    schedules = [torch.optim.lr_scheduler.LambdaLR(opt, _warmup_then_decay) for opt in (sae_adam, torch_adam)]
    for x in _batches(8):
        _step_both(fused, sae_adam, plain, torch_adam, x)
        for schedule in schedules:
            schedule.step()
        assert all(group["lr"] is rate for group in sae_adam.param_groups)
        assert float(rate) == pytest.approx(torch_adam.param_groups[0]["lr"], rel=1e-12)
    tolerance = dict(rtol=1e-5, atol=1e-6) if capturable else dict(rtol=1e-10, atol=1e-12)
    for (name, got), want in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, **tolerance, msg=name)
    other_rate = torch.tensor(5.0, dtype=torch.float64)
    resumed = SAEAdam(fused, lr=other_rate, capturable=capturable)
    resumed.load_state_dict(sae_adam.state_dict())
    assert all(group["lr"] is other_rate for group in resumed.param_groups)
    assert float(other_rate) == float(rate)
    as_number = SAEAdam(fused, lr=1.0)  # and into a number rate: a number
    as_number.load_state_dict(sae_adam.state_dict())
    assert all(group["lr"] == float(rate) and not isinstance(group["lr"], torch.Tensor)
               for group in as_number.param_groups)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("rate", ["number", "tensor"])
@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
def test_on_cuda_matches_torch_adam_with_the_decoder_constraint(capturable, rate):
    """On CUDA every parameter takes a Triton pass (F.adam_, F.decoder_adam_): five fp32 steps as
    torch.optim.Adam between the decoder constraint's two calls, to fp32 rounding, the biases at twice
    the rate (bias_lr_scale); with a tensor rate, which the kernels read, changed in place after every
    step as in the torch optimizer."""
    fused, plain = (sae.to(device="cuda", dtype=torch.float32) for sae in _pair())
    lr = 1e-2 if rate == "number" else torch.tensor(1e-2, device="cuda")
    sae_adam = SAEAdam(fused, lr=lr, capturable=capturable, bias_lr_scale=2.0)
    groups = [{"params": [plain.W_enc, plain.W_dec]}, {"params": [plain.b_enc, plain.b_dec], "lr": 2e-2}]
    torch_adam = torch.optim.Adam(groups, lr=1e-2)
    for step, x in enumerate(_batches(5, torch.float32)):
        _step_both(fused, sae_adam, plain, torch_adam, x.cuda())
        if rate == "tensor":
            lr.fill_(1e-2 * _warmup_then_decay(step))
            for group, scale in zip(torch_adam.param_groups, (1, 2)):
                group["lr"] = scale * 1e-2 * _warmup_then_decay(step)
    for (name, got), want in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
def test_bias_lr_scale_scales_the_biases_rate_only(capturable):
    """bias_lr_scale=4: b_enc and b_dec step as torch.optim.Adam at 4 x lr, W_enc at lr, W_dec at lr
    between the decoder constraint's calls (torch's Adam with two parameter groups)."""
    fused, plain = _pair()
    sae_adam = SAEAdam(fused, lr=1e-2, capturable=capturable, bias_lr_scale=4.0)
    groups = [{"params": [plain.W_enc, plain.W_dec]}, {"params": [plain.b_enc, plain.b_dec], "lr": 4e-2}]
    torch_adam = torch.optim.Adam(groups, lr=1e-2, foreach=True)
    for x in _batches(5):
        _step_both(fused, sae_adam, plain, torch_adam, x)
    tolerance = dict(rtol=1e-5, atol=1e-6) if capturable else dict(rtol=1e-10, atol=1e-12)
    for (name, got), want in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, **tolerance, msg=name)


@pytest.mark.parametrize("scale", [1 / 64, 64.0])
def test_activation_scale_makes_training_independent_of_the_activations_scale(scale):
    """The same SAE trained on x and on scale x (a power of two: exact in fp64), each with SAEAdam's
    bias_lr_scale = activation_scale of its own sample: the same losses, W_enc and W_dec, and biases
    `scale` times as large (to Adam's eps, 1e-8 beside the biases' gradients of about 1e-3 at 64 x: 1e-6
    apart after 6 steps). Without it the biases step alike on both, and the runs part."""
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(256, D, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 2, D) + 3
    batches = [torch.randn(64, D, generator=generator, dtype=torch.float64) + 3 for _ in range(6)]
    runs = {}
    for factor in (1.0, scale):
        for scaled in (True, False):
            torch.manual_seed(0)
            cfg = fastsae.SAEConfig(d_in=D, n_features=N_FEATURES, k=K, dtype="float64", dead_after_tokens=100)
            sae = fastsae.SparseAutoencoder(cfg).initialize(sample * factor)
            rate = fastsae.optim.activation_scale(sae, sample * factor) if scaled else 1.0
            optimizer = SAEAdam(sae, lr=1e-2, bias_lr_scale=rate)
            fvus = []
            for x in batches:
                out = sae(x * factor)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                fvus.append(float(out.fvu.detach()))
            runs[factor, scaled] = (sae, fvus, rate)
    (base, base_fvus, base_rate), (other, other_fvus, other_rate) = runs[1.0, True], runs[scale, True]
    assert other_rate == pytest.approx(scale * base_rate, rel=1e-12)
    assert other_fvus == pytest.approx(base_fvus, rel=1e-5)
    for name in ("W_enc", "W_dec"):
        torch.testing.assert_close(getattr(other, name), getattr(base, name), rtol=1e-4, atol=1e-5, msg=name)
    for name in ("b_enc", "b_dec"):
        torch.testing.assert_close(getattr(other, name), scale * getattr(base, name), rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)  # fmt: skip
    unscaled = runs[scale, False][0]
    assert not torch.allclose(unscaled.b_enc, scale * runs[1.0, False][0].b_enc, rtol=1e-3), "the test would not see it"


def test_activation_scale_is_the_scale_the_sae_reads():
    """A layer_norm SAE reads standardised tokens: its activation scale is theirs (about 1 however large
    the activations), not the raw sample's."""
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(512, D, generator=generator, dtype=torch.float64) * 100 + 50
    cfg = dict(d_in=D, n_features=N_FEATURES, k=K, dtype="float64")
    plain = fastsae.SparseAutoencoder(fastsae.SAEConfig(**cfg)).initialize(sample)
    normalized = fastsae.SparseAutoencoder(fastsae.SAEConfig(**cfg, normalize_activations="layer_norm"))
    normalized.initialize(sample)
    assert 50 < fastsae.optim.activation_scale(plain, sample) < 200
    assert 0.5 < fastsae.optim.activation_scale(normalized, sample) < 1.5


def test_refuses_what_it_cannot_optimise():
    with pytest.raises(TypeError, match="SparseAutoencoder"):
        SAEAdam(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="betas"):
        SAEAdam(_pair()[0], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="capturable=True keeps the moments in the parameters' dtype"):
        SAEAdam(_pair("bfloat16")[0], state_dtype=torch.float32, capturable=True)
    with pytest.raises(ValueError, match="a tensor lr must be a 0-dim floating tensor on the SAE's device"):
        SAEAdam(_pair()[0], lr=torch.tensor([1e-3]))
    with pytest.raises(ValueError, match="a tensor lr must be a 0-dim floating tensor on the SAE's device"):
        SAEAdam(_pair()[0], lr=torch.tensor(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="a tensor lr must be a 0-dim floating tensor on the SAE's device"):
        SAEAdam(_pair()[0], lr=torch.tensor(1e-3, device="meta"))
    for bad in (0.0, -1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ValueError, match="bias_lr_scale must be a finite number > 0"):
            SAEAdam(_pair()[0], bias_lr_scale=bad)
    sae = _pair()[0]
    with pytest.raises(ValueError, match="the sample's scale about b_dec is 0.0"):
        fastsae.optim.activation_scale(sae, sae.b_dec.detach().expand(8, D))
