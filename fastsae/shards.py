"""Checkpoints of feature-sharded SAEs as one file per shard, for SAEs too large to gather on one rank
(`SparseAutoencoder.save_shards` / `SparseAutoencoder.load_shards`).

A directory holds `shard-<i>-of-<n>-<save>.safetensors` (shard i's feature tensors, the whole b_dec
and the other replicated tensors, its feature range and a checksum in the header) and `manifest.json`
(the config, the dtype and each shard's file and feature range). Each file is written atomically, and
the manifest last, once every shard is complete: a directory whose manifest is present is whole. A
save names its files after itself (<save>, drawn by rank 0), so that it never overwrites the files the
manifest names until its own manifest replaces that one: a save cut short leaves the previous save
whole and loadable (its files and the new ones side by side meanwhile: up to twice the disk), where
overwriting them in place had left a manifest over a mix of two saves' shards that loaded as one SAE.
The files the new manifest does not name (the last save's, or a cut save's) are removed after it.
Loading reads, for this rank's features, the parts of the shard files that overlap them, so a set
saved by n shards loads onto any number of shards (or whole).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from . import parallel
from .sae import (
    FEATURE_DIMS,
    FORMAT_VERSION,
    SAEConfig,
    SparseAutoencoder,
    _checksum,
    read_safetensors,
    remove_stale_temporaries,
    saved_config,
    write_atomically,
)

MANIFEST = "manifest.json"
SHARDS_FORMAT = "fastsae-shards"


def save(sae: SparseAutoencoder, directory: str | os.PathLike) -> None:
    """Every rank calls it; the first replica's shards write their files, then rank 0 the manifest."""
    group = sae._feature_group
    if group is None:
        raise ValueError("save_shards is for a feature-sharded SAE; save writes a whole one")
    directory = Path(directory)
    index, count = dist.get_rank(group), dist.get_world_size(group)
    start, stop = sae._feature_start, sae._feature_start + sae.W_dec.shape[0]
    first_replica = sae._group is None or dist.get_rank(sae._group) == 0
    save_id = [uuid.uuid4().hex[:12] if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(save_id, src=0)  # this save's name for its files, on every rank
    if first_replica:
        tensors = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
        metadata = {"fastsae_shard": json.dumps({"start": start, "stop": stop}), "fastsae_checksum": _checksum(tensors)}
        path = directory / _shard_name(index, count, save_id[0])
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    dist.barrier()  # every shard file is complete before the manifest names it
    if dist.get_rank() == 0:
        ranges = parallel.shard_ranges(sae.cfg.n_features, count)
        manifest = {
            "format": SHARDS_FORMAT,
            "version": FORMAT_VERSION,
            "config": dataclasses.asdict(saved_config(sae)),
            "shards": [
                {"file": _shard_name(i, count, save_id[0]), "start": a, "stop": b} for i, (a, b) in enumerate(ranges)
            ],
        }
        write_atomically(directory / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
        listed = {shard["file"] for shard in manifest["shards"]}
        for stale in directory.glob("shard-*-of-*.safetensors"):  # earlier saves' files, and cut saves'
            if stale.name not in listed:
                stale.unlink()
        remove_stale_temporaries(directory, "shard-*-of-*.safetensors")  # a killed save's, to its own names
    dist.barrier()


def load(directory: str | os.PathLike, feature_group, device) -> SparseAutoencoder:
    """This rank's shard over `feature_group` (the whole SAE when None) from a directory `save` wrote.
    Raises FileNotFoundError without a manifest (no complete save) and ValueError for a shard file
    that is missing, corrupted (its checksum) or does not match the manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a complete save_shards directory")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != SHARDS_FORMAT:
        raise ValueError(f"{manifest_path} is not a fastsae shard manifest")
    cfg = SAEConfig(**manifest["config"])
    sae = SparseAutoencoder(cfg, feature_group=feature_group, draw_directions=False)  # every tensor is loaded
    start, stop = sae._feature_start, sae._feature_start + sae.W_dec.shape[0]
    state = sae.state_dict()
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURE_DIMS}
    replicated_from = None
    for shard in manifest["shards"]:
        first, last = max(start, shard["start"]), min(stop, shard["stop"])
        if first >= last:  # none of this rank's features
            continue
        path = directory / shard["file"]
        if not path.is_file():
            raise ValueError(f"{path}, named by {manifest_path}, is missing")
        metadata, tensors = read_safetensors(path)
        if _checksum(tensors) != metadata.get("fastsae_checksum"):
            raise ValueError(f"{path} is corrupted: its tensors do not match the checksum written when it was saved")
        if json.loads(metadata["fastsae_shard"]) != {"start": shard["start"], "stop": shard["stop"]}:
            raise ValueError(f"{path} holds other features than {manifest_path} says")
        if replicated_from is None:  # b_dec and the other whole tensors: every shard file holds them
            replicated_from = tensors
        for name, dim in FEATURE_DIMS.items():
            pieces[name].append(tensors[name].narrow(dim, first - shard["start"], last - first))
    for name, tensor in replicated_from.items():
        state[name] = torch.cat(pieces[name], FEATURE_DIMS[name]) if name in FEATURE_DIMS else tensor
    for name, tensor in state.items():
        expected = sae.state_dict()[name]
        if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            raise ValueError(f"{directory}: {name} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                             f"{expected.dtype} {tuple(expected.shape)}")  # fmt: skip
    sae.load_state_dict(state)
    return sae.to(device)


def _shard_name(index: int, count: int, save_id: str) -> str:
    return f"shard-{index:05d}-of-{count:05d}-{save_id}.safetensors"
