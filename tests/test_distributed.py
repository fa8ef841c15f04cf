"""Multi-process training on torch.distributed (gloo on CPU), against one process:

- data parallel: N replicas of B tokens, each a `data_parallel` SAE wrapped in DistributedDataParallel,
  train exactly as one process on the N x B tokens (the same initial centering and directions, losses,
  death statistics and parameters after several Adam steps);
- feature sharding: N ranks each holding F / N features (`shard_features`) give the same codes,
  losses, gradients and, after 20 Adam steps, parameters and statistics as the whole SAE; the saved
  checkpoint is the whole SAE and loads sharded over another number of ranks;
- both on a 2 x 2 mesh.

FASTSAE_TEST_BACKEND=nccl runs the processes on GPUs instead (one each; cases needing more GPUs than
the machine has are skipped), for the multi-GPU machine."""

import csv
import gc
import json
import os
import socket
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import fastsae
from fastsae import parallel
from fastsae.ops import batchtopk
from fastsae.sae import FEATURE_DIMS

D, N_FEATURES, K, K_AUX, TOKENS, STEPS = 12, 48, 4, 6, 26, 6  # 26 tokens: uneven over 3 or 4 replicas


BACKEND = os.environ.get("FASTSAE_TEST_BACKEND", "gloo")


def _in_group(rank, world, port, body, *args):
    """Runs body(rank, world, *args) in this test process's group (on its own GPU under NCCL). The
    body's objects that hold the group (modules, autograd graphs) are collected before every rank
    meets at a barrier and the group is destroyed: gloo's threads aborted the process (SIGABRT) when
    such objects were left for the interpreter's shutdown, or when a rank left while another was still
    finishing its last collective."""
    if BACKEND == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        body(rank, world, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _local(value):
    """`value` (a tensor, a module, or a list or tuple of them) on this process's device."""
    if isinstance(value, (list, tuple)):
        return type(value)(_local(item) for item in value)
    return value.to(f"cuda:{dist.get_rank()}" if BACKEND == "nccl" else "cpu")


def _spawn(body, args, processes):
    """body(rank, world, *args) in `processes` processes (`_in_group`), or a skip where NCCL would
    need more GPUs than there are."""
    if BACKEND == "nccl" and processes > torch.cuda.device_count():
        pytest.skip(f"{processes} processes under NCCL need {processes} GPUs")
    mp.spawn(_in_group, args=(processes, _free_port(), body, *args), nprocs=processes, join=True)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _data(steps=STEPS, crowd=False):
    """A shared sample and `steps` global batches, with an outlier dimension; with `crowd`, the third
    batch's first tokens scaled up so that they hold most of its largest codes."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(64, D, generator=generator, dtype=torch.float64) + 3
    batches = [torch.randn(TOKENS, D, generator=generator, dtype=torch.float64) + 3 for _ in range(steps)]
    if crowd:
        batches[2][:2] *= 30
    return sample, batches


def _cfg(activation="topk", matryoshka_widths=()):
    k_aux = K_AUX if activation == "topk" else 0
    return fastsae.SAEConfig(d_in=D, n_features=N_FEATURES, k=K, k_aux=k_aux, activation=activation, dtype="float64",
                             dead_after_tokens=30, matryoshka_widths=matryoshka_widths)  # fmt: skip


def _sae(activation="topk", matryoshka_widths=()):
    return fastsae.SparseAutoencoder(_cfg(activation, matryoshka_widths))


def _train(model, sae, batches, full_grad=lambda name, grad: grad, averaging=False):
    """Adam steps on `batches` through `model` (`sae` or its DDP wrapper; with `averaging`, `sae` with
    its gradients averaged by `parallel.averaging_gradients`): per step the losses and the TopK codes
    (sorted by feature; None for dense codes), and every parameter's gradient of the first step
    (`full_grad` turns a shard's into the whole SAE's)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses, codes, first_grads = [], [], None
    for x in batches:
        out = model(x)
        with parallel.averaging_gradients(list(sae.parameters()), sae._group) if averaging else nullcontext():
            out.loss.backward()
        if first_grads is None:
            first_grads = {name: full_grad(name, p.grad.clone()) for name, p in sae.named_parameters()}
        sae.remove_decoder_parallel_grad()
        optimizer.step()
        optimizer.zero_grad()
        sae.normalize_decoder()
        losses.append(_losses(out))
        if out.idx is None:
            codes.append(None)
        else:
            order = out.idx.long().argsort(dim=1)
            codes.append((out.idx.long().gather(1, order), out.vals.detach().gather(1, order)))
    return losses, codes, first_grads


def _losses(out):
    return tuple(float(t.detach()) for t in (out.fvu, out.auxk, out.mse, out.sparsity))


def _one_process(activation="topk"):
    """The whole SAE trained by one process on the whole batches: (the SAE, its losses per step)."""
    sample, batches = _data()
    torch.manual_seed(1)
    single = _sae(activation).initialize(sample)
    expected_losses, _, _ = _train(single, single, batches)
    return single, expected_losses


def _data_parallel_replica(rank, world, activation, crowd=False):
    """This rank's data-parallel SAE, initialised on its share of the sample, and its share of each
    batch."""
    # Rank 0 has the single process's RNG state; the others differ, and must still get its directions.
    torch.manual_seed(1 if rank == 0 else 100 + rank)
    sample, batches = _local(_data(crowd=crowd))
    sae = _local(_sae(activation)).data_parallel()
    sae.initialize(sample.chunk(world)[rank])
    return sae, [x.chunk(world)[rank] for x in batches]


def _save_rank0(rank, result_path, losses, sae, sparse_steps):
    if rank == 0:
        torch.save((losses, {name: t.cpu() for name, t in sae.state_dict().items()}, sparse_steps), result_path)


def _replica(rank, world, activation, result_path, crowd=False, averaging=False):
    sae, batches = _data_parallel_replica(rank, world, activation, crowd)
    model = sae if averaging else DistributedDataParallel(sae)
    losses, codes, _ = _train(model, sae, batches, averaging=averaging)
    sparse_steps = [step for step, step_codes in enumerate(codes) if step_codes is not None]
    _save_rank0(rank, result_path, losses, sae, sparse_steps)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("activation", "world"),
    [("topk", 2), ("topk", 4), ("relu", 2), ("jumprelu", 3), ("batchtopk", 2), ("batchtopk", 3)],
    ids=lambda v: str(v),
)
def test_data_parallel_trains_like_one_process(activation, world, tmp_path, monkeypatch):
    """Losses, the sparsity penalty (ReLU's L1, JumpReLU's L0 with its estimator window), BatchTopK's
    selection over every replica's tokens, and every parameter and statistic (BatchTopK's inference
    threshold too) after STEPS Adam steps match one process on the whole batch. Over 3 or 4
    replicas the batches split unevenly (9 + 9 + 8, 7 + 7 + 7 + 5 tokens), which the losses'
    normalisation over every replica's tokens must not notice. BatchTopK here on its dense codes (the
    sparse ones: the next test)."""
    monkeypatch.setattr(batchtopk, "SPARSE_CODES", False)
    monkeypatch.setenv("FASTSAE_BATCHTOPK_SPARSE", "0")  # read at import by the spawned replicas
    single, expected_losses = _one_process(activation)
    result_path = tmp_path / "rank0.pt"
    _spawn(_replica, (activation, result_path), world)
    losses, state, _ = _load(result_path)
    _assert_trained_alike(single, expected_losses, losses, state)
    if activation == "topk":
        assert any(auxk > 0 for _, auxk, _, _ in expected_losses), "AuxK never ran: the test would not cover it"
    elif activation != "batchtopk":  # BatchTopK: its codes and inference threshold are in the state
        assert all(sparsity > 0 for *_, sparsity in expected_losses), "no sparsity penalty: the test would not cover it"


@pytest.mark.parametrize("world", [2, 3])
def test_averaging_gradients_trains_like_one_process(world, tmp_path):
    """Without DistributedDataParallel, `parallel.averaging_gradients` around each replica's backward
    (what `graphs.CapturedStep` captures for a data-parallel SAE) trains a TopK SAE with AuxK as one
    process on the whole batch does: losses, parameters and statistics after STEPS Adam steps."""
    single, expected_losses = _one_process()
    result_path = tmp_path / "rank0.pt"
    _spawn(_replica, ("topk", result_path, False, True), world)
    losses, state, _ = _load(result_path)
    _assert_trained_alike(single, expected_losses, losses, state)
    assert any(auxk > 0 for _, auxk, _, _ in expected_losses), "AuxK never ran: the test would not cover it"


def _captured_replica(rank, world, result_path):
    sae, batches = _data_parallel_replica(rank, world, "topk")
    step = fastsae.graphs.CapturedStep(sae, torch.optim.Adam(sae.parameters(), lr=1e-2, capturable=True))
    _save_rank0(rank, result_path, [_losses(step(x)) for x in batches], sae, [])


@pytest.mark.skipif(BACKEND != "nccl", reason="CUDA graphs: the NCCL run on GPUs")
def test_captured_data_parallel_step_trains_like_one_process(tmp_path):
    """`graphs.CapturedStep` of a data-parallel TopK SAE on 2 GPUs (its warm-up steps eager, the rest
    replayed, the gradients' all-reduces inside the graph) trains as one process on the whole batch."""
    single, expected_losses = _one_process()
    result_path = tmp_path / "rank0.pt"
    _spawn(_captured_replica, (result_path,), 2)
    losses, state, _ = _load(result_path)
    _assert_trained_alike(single, expected_losses, losses, state, rel=1e-6)


def _assert_trained_alike(single, expected_losses, losses, state, rel=1e-9):
    for got, want in zip(losses, expected_losses):
        assert got == pytest.approx(want, rel=rel, abs=1e-12)
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=rel, atol=1e-12, msg=name)


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_batchtopk_trains_like_one_process_on_sparse_codes(world, tmp_path, monkeypatch):
    """FASTSAE_BATCHTOPK_SPARSE=1 in the replicas: BatchTopK over every replica's tokens from each row's
    candidates (the sparse codes) trains as one process on the dense codes, and a batch whose first
    tokens crowd out the rest's codes (more than their candidates) takes the dense codes on every
    replica, with the same result."""
    sample, batches = _data(crowd=True)
    torch.manual_seed(1)
    single = _sae("batchtopk").initialize(sample)
    monkeypatch.setattr(batchtopk, "SPARSE_CODES", False)  # the one process on the dense codes
    expected_losses, _, _ = _train(single, single, batches)
    monkeypatch.setenv("FASTSAE_BATCHTOPK_SPARSE", "1")  # read at import by the spawned replicas
    result_path = tmp_path / "rank0.pt"
    _spawn(_replica, ("batchtopk", result_path, True), world)
    losses, state, sparse_steps = _load(result_path)
    _assert_trained_alike(single, expected_losses, losses, state)
    assert 2 not in sparse_steps and len(sparse_steps) >= STEPS - 2, sparse_steps


def _bf16_threshold_replica(rank, world, result_path):
    sae = _local(_sae("batchtopk")).data_parallel()
    # 257 x 8 distinct positive bf16 codes per replica (consecutive bit patterns), none shared
    bits = torch.arange(257 * 8) + 0x3C00 + rank * 257 * 8
    codes = _local(bits.to(torch.int16).view(torch.bfloat16).reshape(257, 8))
    threshold = sae._replicated_batch_threshold(codes, 257)
    everything = [torch.empty_like(codes) for _ in range(world)]
    dist.all_gather(everything, codes)
    if rank == 0:
        expected = torch.cat(everything).flatten().topk(K * 257 * world).values[-1]
        torch.save((threshold.cpu(), expected.cpu()), result_path)


def test_data_parallel_batchtopk_budget_counts_every_token_in_bf16(tmp_path):
    """BatchTopK over 2 replicas of 257 tokens with bf16 codes takes the (k x 514)-th largest code as
    its threshold: the token count that sets the budget is summed in fp64 (in bf16, 257 rounds to 256
    and the budget to k x 512)."""
    result_path = tmp_path / "threshold.pt"
    _spawn(_bf16_threshold_replica, (result_path,), 2)
    threshold, expected = _load(result_path)
    assert torch.equal(threshold, expected), (threshold, expected)


def _activation_scale_replica(rank, world, result_path):
    torch.manual_seed(1 if rank == 0 else 100 + rank)
    sample = _local(_data()[0])
    sae = _local(_sae()).data_parallel()
    sae.initialize(sample.chunk(world)[rank])
    scale = fastsae.optim.activation_scale(sae, sample.chunk(world)[rank])
    if rank == 0:
        torch.save(scale, result_path)


def test_activation_scale_is_every_replicas(tmp_path):
    """A data-parallel SAE's activation_scale (SAEAdam's bias_lr_scale) is over every replica's sample,
    as one process's over the whole, so that the replicas' biases step alike."""
    sample = _data()[0]
    torch.manual_seed(1)
    single = _sae().initialize(sample)
    _spawn(_activation_scale_replica, (tmp_path / "scale.pt",), 2)
    assert _load(tmp_path / "scale.pt") == pytest.approx(fastsae.optim.activation_scale(single, sample), rel=1e-9)


def test_data_parallel_needs_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        _sae().data_parallel()


SHARDED_STEPS = 20


def _full_grad(sae):
    return lambda name, grad: (
        parallel.gather_rows(grad, sae._feature_group, FEATURE_DIMS[name]) if name in FEATURE_DIMS else grad
    )


def _sharded_replica(rank, world, directory):
    torch.manual_seed(1 if rank == 0 else 100 + rank)  # rank 0 has the single process's RNG state
    if world == 4:  # AuxK through the fused encode's second stream (with 2 ranks: dense over the dead)
        fastsae.sae.AUXK_DENSE_MAX_ELEMENTS = 0
    sample, batches = _local(_data(SHARDED_STEPS))
    if world == 2:  # the whole SAE, then sharded
        sae = _local(_sae()).shard_features()
    else:  # built as a shard
        sae = _local(fastsae.SparseAutoencoder(_cfg(), feature_group=dist.group.WORLD))
    sae.initialize(sample)
    record = _train(sae, sae, batches, _full_grad(sae))
    sae.save(directory / "sharded.safetensors")
    sae.save_shards(directory / "shards")
    if rank == 0:
        losses, codes, grads = record
        codes = [(idx.cpu(), vals.cpu()) for idx, vals in codes]
        torch.save((losses, codes, {name: grad.cpu() for name, grad in grads.items()}), directory / "record.pt")


def _resharded_forward(rank, world, directory):
    """The checkpoint saved by another number of shards, loaded whole and sharded over `world`."""
    whole = _local(fastsae.SparseAutoencoder.load(directory / "sharded.safetensors")).shard_features()
    from_shards = _local(fastsae.SparseAutoencoder.load_shards(directory / "shards", dist.group.WORLD))
    outputs = []
    x = _local(_data()[1][0])
    for sae in (whole, from_shards):
        out = sae(x)
        outputs.append((out.recon.detach().cpu(), out.idx.long().sort(dim=1).values.cpu(), float(out.loss.detach())))
    whole.eval()  # the public encode (global codes, [batch, seq, d] input) and decode
    codes = whole.encode(x.view(2, 13, D))
    api = (codes.idx.long().sort(dim=-1).values.cpu(), whole.decode(codes).detach().cpu())
    if rank == 0:
        torch.save((outputs, api), directory / "resharded.pt")


def _assert_same_training(record, expected):
    (losses, codes, grads), (want_losses, want_codes, want_grads) = record, expected
    for got, want in zip(losses, want_losses):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert any(auxk > 0 for _, auxk, _, _ in want_losses), "AuxK never ran: the test would not cover it"
    for (idx, vals), (want_idx, want_vals) in zip(codes, want_codes):
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(vals, want_vals, rtol=1e-9, atol=1e-12)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=f"first-step gradient of {name}")


def _check_damaged_shards(directory, world):
    """A shard directory without its manifest, with a flipped bit or without a shard file never loads."""
    files = [shard["file"] for shard in json.loads((directory / "manifest.json").read_text())["shards"]]
    assert len(files) == world and sorted(path.name for path in directory.glob("shard-*")) == sorted(files)
    last = directory / files[-1]
    data = bytearray(last.read_bytes())
    data[-3] ^= 0x10
    last.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        fastsae.SparseAutoencoder.load_shards(directory)
    last.unlink()
    with pytest.raises(ValueError, match="is missing"):
        fastsae.SparseAutoencoder.load_shards(directory)
    (directory / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete save_shards directory"):
        fastsae.SparseAutoencoder.load_shards(directory)


def _cut_save(rank, world, directory):
    """A save of the shards cut before its manifest (rank 0's write fails) leaves the save before it
    whole: that one loads, and the next complete save replaces both."""
    sample, _ = _data(1)
    sae = _local(fastsae.SparseAutoencoder(_cfg(), feature_group=dist.group.WORLD))
    sae.initialize(_local(sample))
    sae.save_shards(directory)
    first = {name: t.clone() for name, t in sae.state_dict().items()}
    with torch.no_grad():
        sae.W_dec.add_(1.0)
    write = fastsae.shards.write_atomically

    def manifest_fails(path, writer):
        if path.name == fastsae.shards.MANIFEST:
            raise OSError("no space left on device")
        write(path, writer)

    fastsae.shards.write_atomically = manifest_fails
    try:
        sae.save_shards(directory)
    except OSError:  # rank 0's; it meets the others at the barrier they wait at
        assert rank == 0
        dist.barrier()
    finally:
        fastsae.shards.write_atomically = write
    assert len(list(directory.glob("shard-*"))) == 2 * world  # the first save's files and the cut one's
    loaded = fastsae.SparseAutoencoder.load_shards(directory, dist.group.WORLD)
    for name, tensor in first.items():
        assert torch.equal(loaded.state_dict()[name].to(tensor.device), tensor), f"{name}: not the first save's"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that has ended: the killed save below was its
    killed = directory / f".shard-00000-of-00002-0123456789ab.safetensors.{socket.gethostname()}.{dead.pid}.x.tmp"
    dist.barrier()  # every rank has read the directory before the next save removes files
    if rank == 0:
        killed.write_bytes(b"part of a shard")
    sae.save_shards(directory)
    assert len(list(directory.glob("shard-*"))) == world
    assert not killed.exists(), "a killed save's temporary file was left"
    loaded = fastsae.SparseAutoencoder.load_shards(directory, dist.group.WORLD)
    assert torch.equal(loaded.W_dec.to(sae.W_dec.device), sae.W_dec.detach())


def test_cut_shard_save_leaves_the_last_save_whole(tmp_path):
    _spawn(_cut_save, (tmp_path,), 2)


@pytest.mark.parametrize("world", [2, 4])
def test_feature_sharding_trains_like_one_process(world, tmp_path):
    """Codes, losses (AuxK included), every first-step gradient and, after 20 Adam steps, every parameter
    and statistic equal the whole SAE's (2 ranks shard the whole SAE and take AuxK dense over their dead
    features, 4 build their shards directly and take it from the fused encode).
    The saved file and the per-shard files (save_shards) both hold the whole SAE, and sharded over 3
    ranks each gives the whole SAE's forward."""
    sample, batches = _data(SHARDED_STEPS)
    torch.manual_seed(1)
    single = _sae().initialize(sample)
    expected = _train(single, single, batches)

    _spawn(_sharded_replica, (tmp_path,), world)
    _assert_same_training(_load(tmp_path / "record.pt"), expected)
    saved = fastsae.SparseAutoencoder.load(tmp_path / "sharded.safetensors")
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], tensor, rtol=1e-9, atol=1e-12, msg=name)

    from_shards = fastsae.SparseAutoencoder.load_shards(tmp_path / "shards")  # whole, from the shard files
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(from_shards.state_dict()[name], tensor, rtol=1e-9, atol=1e-12, msg=name)

    reshard = 3 if BACKEND != "nccl" else min(3, torch.cuda.device_count())  # another count where there are GPUs
    _spawn(_resharded_forward, (tmp_path,), reshard)
    x = _data()[1][0]
    want = single(x)
    outputs, (idx, recon) = _load(tmp_path / "resharded.pt")
    for got_recon, got_idx, loss in outputs:  # from the file, from the shard files
        torch.testing.assert_close(got_recon, want.recon.detach(), rtol=1e-9, atol=1e-12)
        assert torch.equal(got_idx, want.idx.long().sort(dim=1).values)
        assert loss == pytest.approx(float(want.loss.detach()), rel=1e-9)
    single.eval()
    codes = single.encode(x.view(2, 13, D))
    assert torch.equal(idx, codes.idx.long().sort(dim=-1).values)
    torch.testing.assert_close(recon, single.decode(codes).detach(), rtol=1e-9, atol=1e-12)
    _check_damaged_shards(tmp_path / "shards", world)


def _mesh_replica(rank, world, directory, matryoshka_widths):
    """2 replicas x 2 feature shards: rank = 2 * replica + shard."""
    replica, shard = divmod(rank, 2)
    rows = [dist.new_group([2 * r, 2 * r + 1]) for r in range(2)]  # every rank creates every group
    columns = [dist.new_group([s, 2 + s]) for s in range(2)]
    torch.manual_seed(1 if rank == 0 else 100 + rank)
    sample, batches = _local(_data())
    sae = _local(_sae(matryoshka_widths=matryoshka_widths)).shard_features(rows[replica]).data_parallel(columns[shard])
    sae.initialize(sample.chunk(2)[replica])
    model = DistributedDataParallel(sae, process_group=columns[shard])
    record = _train(model, sae, [x.chunk(2)[replica] for x in batches], _full_grad(sae))
    sae.save(directory / "mesh.safetensors")
    if rank == 0:
        torch.save(record[0], directory / "losses.pt")


@pytest.mark.parametrize("matryoshka_widths", [(), (8, 30)], ids=["plain", "matryoshka"])
def test_mesh_of_replicas_and_shards_trains_like_one_process(matryoshka_widths, tmp_path):
    """Data parallel over 2 replicas of 2 feature shards each: the losses and, after the steps, the
    saved SAE equal one process training the whole SAE on the whole batches; also a Matryoshka SAE's,
    whose prefixes span both shards (8 of the first 24 features, 30 of all 48) and whose prefix losses
    are normalised over every replica's tokens."""
    sample, batches = _data()
    torch.manual_seed(1)
    single = _sae(matryoshka_widths=matryoshka_widths).initialize(sample)
    want_losses = _train(single, single, batches)[0]

    _spawn(_mesh_replica, (tmp_path, matryoshka_widths), 4)
    for got, want in zip(_load(tmp_path / "losses.pt"), want_losses):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    saved = fastsae.SparseAutoencoder.load(tmp_path / "mesh.safetensors")
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], tensor, rtol=1e-9, atol=1e-12, msg=name)


def _refusals(rank, world):
    with pytest.raises(ValueError, match="supports TopK"):
        _sae("relu").shard_features()
    uncapturable = ((_sae().shard_features(), "feature-sharded"), (_sae("relu").data_parallel(), "TopK SAEs only"))
    for sae, message in uncapturable:
        with pytest.raises(ValueError, match=message):  # graph capture of what it cannot capture yet
            fastsae.graphs.CapturedStep(sae, torch.optim.Adam(sae.parameters(), capturable=True))
    tiny = fastsae.SAEConfig(d_in=D, n_features=10, k=6, k_aux=0, dtype="float64")
    with pytest.raises(ValueError, match="fewer than k=6"):
        fastsae.SparseAutoencoder(tiny, feature_group=dist.group.WORLD)
    sae = _local(_sae()).shard_features()
    with pytest.raises(RuntimeError, match="already feature-sharded"):
        sae.shard_features()
    with pytest.raises(ValueError, match="fastsae format only"):
        sae.save("unused", format="saelens")
    with pytest.raises(NotImplementedError, match="load the saved SAE whole"):
        sae.fire_and_positive_counts(_local(_data()[1][0]))


def test_feature_sharding_refuses_what_it_cannot_shard():
    with pytest.raises(RuntimeError, match="init_process_group"):
        _sae().shard_features()
    _spawn(_refusals, (), 2)


def test_distributed_benchmark_runs_and_checks_itself(tmp_path):
    """bench.bench_distributed under torchrun on 2 CPU processes (gloo, its tiny shape): it checks the
    data-parallel FVU and the sharded codes before timing, rank 0 writes every row and prints the
    profile of each DistributedDataParallel variant and of the feature-sharded step."""
    csv_path = tmp_path / "rows.csv"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "bench.bench_distributed", "--device", "cpu", "--csv", str(csv_path), "--profile"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for provider in ("fastsae", "fastsae_nobroadcast"):  # every DistributedDataParallel variant, profiled
        title = f"== data parallel tiny ({provider}), 2 processes, rank 0:"
        assert result.stdout.count(title) == 1, result.stdout[-2000:]
    assert result.stdout.count("== feature sharding d16_F256_B64_k4, 2 processes, rank 0:") == 1, result.stdout[-2000:]
    assert "host launches per step" in result.stdout and "allreduce" in result.stdout, result.stdout[-4000:]
    rows = {(row["op"], row["provider"]) for row in csv.DictReader(open(csv_path, newline=""))}
    assert rows == {("train_step_dp", "fastsae_1gpu"), ("train_step_dp", "fastsae_2gpu"),
                    ("train_step_dp", "fastsae_nobroadcast_2gpu"),
                    ("train_step_sharded", "fastsae_1gpu"), ("train_step_sharded", "fastsae_2gpu"),
                    ("train_step_sharded", "comm_2gpu")}  # fmt: skip
