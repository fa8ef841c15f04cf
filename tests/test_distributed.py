"""Data-parallel training on torch.distributed (gloo on CPU): N replicas of B tokens, each a
`data_parallel` SAE wrapped in DistributedDataParallel, train exactly as one process on the N x B
tokens: the same initial centering and directions, losses, death statistics and parameters after
several Adam steps."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fastsae

D, N_FEATURES, K, K_AUX, TOKENS, STEPS = 12, 48, 4, 6, 26, 6  # 26 tokens: uneven over 3 or 4 replicas


def _data():
    """A shared sample and STEPS global batches, with an outlier dimension."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(64, D, generator=generator, dtype=torch.float64) + 3
    batches = [torch.randn(TOKENS, D, generator=generator, dtype=torch.float64) + 3 for _ in range(STEPS)]
    return sample, batches


def _sae(activation="topk"):
    k_aux = K_AUX if activation == "topk" else 0
    cfg = fastsae.SAEConfig(d_in=D, n_features=N_FEATURES, k=K, k_aux=k_aux, activation=activation, dtype="float64",
                            dead_after_tokens=30)  # fmt: skip
    return fastsae.SparseAutoencoder(cfg)


def _train(model, sae, batches):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for x in batches:
        out = model(x)
        out.loss.backward()
        sae.remove_decoder_parallel_grad()
        optimizer.step()
        optimizer.zero_grad()
        sae.normalize_decoder()
        losses.append(tuple(float(t.detach()) for t in (out.fvu, out.auxk, out.mse, out.sparsity)))
    return losses


def _replica(rank, world, port, activation, result_path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # Rank 0 has the single process's RNG state; the others differ, and must still get its directions.
        torch.manual_seed(1 if rank == 0 else 100 + rank)
        sample, batches = _data()
        sae = _sae(activation).data_parallel()
        sae.initialize(sample.chunk(world)[rank])
        losses = _train(DistributedDataParallel(sae), sae, [x.chunk(world)[rank] for x in batches])
        if rank == 0:
            torch.save((losses, sae.state_dict()), result_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("activation", "world"), [("topk", 2), ("topk", 4), ("relu", 2), ("jumprelu", 3)], ids=lambda v: str(v)
)
def test_data_parallel_trains_like_one_process(activation, world, tmp_path):
    """Losses, the sparsity penalty (ReLU's L1, JumpReLU's L0 with its estimator window) and every
    parameter and statistic after STEPS Adam steps match one process on the whole batch. Over 3 or 4
    replicas the batches split unevenly (9 + 9 + 8, 7 + 7 + 7 + 5 tokens), which the losses'
    normalisation over every replica's tokens must not notice."""
    sample, batches = _data()
    torch.manual_seed(1)
    single = _sae(activation).initialize(sample)
    expected_losses = _train(single, single, batches)

    result_path = tmp_path / "rank0.pt"
    mp.spawn(_replica, args=(world, _free_port(), activation, result_path), nprocs=world, join=True)
    losses, state = torch.load(result_path, weights_only=True)
    for got, want in zip(losses, expected_losses):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    if activation == "topk":
        assert any(auxk > 0 for _, auxk, _, _ in expected_losses), "AuxK never ran: the test would not cover it"
    else:
        assert all(sparsity > 0 for *_, sparsity in expected_losses), "no sparsity penalty: the test would not cover it"
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-9, atol=1e-12, msg=name)


def test_data_parallel_refuses_batchtopk(tmp_path):
    """BatchTopK's batch threshold would need every replica's codes: refused by name, not trained wrongly."""
    mp.spawn(_refuses_batchtopk, args=(_free_port(),), nprocs=1, join=True)


def _refuses_batchtopk(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    try:
        with pytest.raises(ValueError, match="BatchTopK"):
            _sae("batchtopk").data_parallel()
    finally:
        dist.destroy_process_group()


def test_data_parallel_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        _sae().data_parallel()
