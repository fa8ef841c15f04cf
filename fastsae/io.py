"""The checkpoint formats SAE users already have, both ways: SAELens and EleutherAI's sparsify.

    sae = SparseAutoencoder.load("path")                  # detects the format (see detect_format)
    sae.save("out_dir", format="saelens")                 # or "sparsify"; "fastsae" (one file) by default
    saes = load_hookpoints("sparsify_run/")               # a directory of per-hookpoint SAEs
    sae = load_hub("EleutherAI/sae-llama-3-8b-32x", "layers.10")   # from the Hugging Face Hub

SAELens (`SAE.save_model` / `SAE.load_from_disk`): a directory holding cfg.json and
sae_weights.safetensors with W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in] and,
for JumpReLU, threshold [d_sae]. Architectures: "standard" (ReLU), "topk" (k), "jumprelu",
"batchtopk" (k; JumpReLU at its threshold in eval mode). SAELens encodes
act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc); without apply_b_dec_to_input the b_dec term is
folded into b_enc (b_enc + b_dec @ W_enc), which gives the same pre-activations. JumpReLU codes are
ReLU'd first, so a negative threshold acts as 0. normalize_activations "layer_norm" (each token
standardised at run time) loads as the SAEConfig option of that name; the other run-time normalisations
and decoder-norm rescaling of TopK codes change the function in ways a fastsae SAE does not compute: they
are refused with an error.

sparsify (`SparseCoder.save_to_disk`): a directory holding cfg.json (k, num_latents or
expansion_factor, d_in) and sae.safetensors with encoder.weight [F, d] (W_enc transposed),
encoder.bias, W_dec [F, d] and b_dec; codes are the k largest of relu((x - b_dec) @ W_enc + b_enc), a
TopK SAE's. Transcoders and skip connections are refused. A training run writes one such directory
per hook point, which `load_hookpoints` reads.

Each file is written atomically (`sae.write_atomically`): a crash leaves every earlier file intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .sae import DTYPES, NORMALIZATIONS, SAEConfig, SparseAutoencoder, read_safetensors, write_atomically

FORMATS = ("fastsae", "saelens", "sparsify")
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
SPARSIFY_FILES = ("cfg.json", "sae.safetensors")
SAVED_CONFIG = "fastsae_cfg"  # the weights file's metadata key for the cfg.json saved beside it
SAELENS_ACTIVATIONS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}


def detect_format(path: str | os.PathLike) -> str:
    """ "fastsae" for a file, "saelens" or "sparsify" for a directory holding that library's files; a
    clear error for anything else."""
    path = Path(path)
    if path.is_file():
        return "fastsae"
    if not path.is_dir():
        raise FileNotFoundError(f"no SAE checkpoint at {path}")
    for name, files in (("saelens", SAELENS_FILES), ("sparsify", SPARSIFY_FILES)):
        if all((path / file).is_file() for file in files):
            return name
    raise ValueError(
        f"{path} is a directory but neither a SAELens SAE ({' + '.join(SAELENS_FILES)}) nor a sparsify SAE "
        f"({' + '.join(SPARSIFY_FILES)}); for a directory of per-hookpoint SAEs use fastsae.io.load_hookpoints"
    )


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An SAE from a checkpoint in any of FORMATS (`detect_format`)."""
    loaders = {"fastsae": SparseAutoencoder.load, "saelens": load_saelens, "sparsify": load_sparsify}
    return loaders[detect_format(path)](path, device)


def save(sae: SparseAutoencoder, path: str | os.PathLike, format: str = "fastsae") -> None:
    """Writes `sae` in one of FORMATS: a file for fastsae, a directory for the others."""
    savers = {"fastsae": SparseAutoencoder.save, "saelens": save_saelens, "sparsify": save_sparsify}
    if format not in savers:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    savers[format](sae, path)


def load_hub(
    repo_id: str, path: str = "", revision: str | None = None, device: str | torch.device = "cpu"
) -> SparseAutoencoder:
    """An SAE from a Hugging Face Hub repository (`huggingface_hub.snapshot_download`, its cache and
    its token): `path` inside the repository names a SAELens or sparsify SAE directory ("layers.10" of
    EleutherAI's per-hookpoint sparsify releases; "" for one at the repository's root) or a fastsae
    .safetensors file. Only that SAE's files are downloaded; HF_HUB_OFFLINE=1 reads the cache alone."""
    from huggingface_hub import snapshot_download

    path = path.strip("/")
    if path.endswith(".safetensors"):
        patterns = [path]
    else:
        patterns = [f"{path}/{name}" if path else name for name in (*SAELENS_FILES, *SPARSIFY_FILES)]
    local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns)) / path
    if not local.exists() or (local.is_dir() and not any(local.iterdir())):  # (none of the files matched)
        where = f"at {path!r}" if path else "at its root (name the SAE's directory in it)"
        raise FileNotFoundError(f"the Hub repository {repo_id} holds no SAE checkpoint {where}")
    return load(local, device)


def load_hookpoints(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, SparseAutoencoder]:
    """{hook point: SAE} from a directory holding one SAELens or sparsify SAE directory per hook point
    (as a sparsify training run writes them), named by the hook point."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no directory of SAEs at {path}")
    saes = {}
    for child in sorted(path.iterdir()):
        if child.is_dir() and (child / "cfg.json").is_file():
            saes[child.name] = load(child, device)
    if not saes:
        raise ValueError(f"{path} holds no SAE directories (subdirectories with a cfg.json)")
    return saes


# ---------------------------------------------------------------------------------------------------
# SAELens


def load_saelens(path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    path = Path(path)
    cfg = _read_json(path / "cfg.json")
    tensors = _read_weights(path / "sae_weights.safetensors", cfg)
    architecture = cfg.get("architecture", "standard")
    if architecture not in SAELENS_ACTIVATIONS:
        raise ValueError(f"{path}: SAELens architecture {architecture!r} is not supported; "
                         f"fastsae reads {sorted(SAELENS_ACTIVATIONS)}")  # fmt: skip
    normalization = cfg.get("normalize_activations", "none")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{path}: normalize_activations={normalization!r} rescales inputs at run time in a way a "
                         f"fastsae SAE does not (it reads {NORMALIZATIONS}); fold the scaling into the weights "
                         "first")  # fmt: skip
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    needed = ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if architecture == "jumprelu" else ())
    _require(path, tensors, needed)
    W_enc, b_enc, W_dec, b_dec = (tensors[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    d_in, d_sae = W_enc.shape
    _check_sizes(path, {"d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae")}, {"d_in": d_in, "d_sae": d_sae})
    if cfg.get("rescale_acts_by_decoder_norm") and not torch.allclose(W_dec.float().norm(dim=1), torch.ones(d_sae)):
        raise ValueError(f"{path}: rescale_acts_by_decoder_norm with decoder rows that are not unit-norm ranks "
                         "codes differently from a fastsae TopK SAE")  # fmt: skip
    if not cfg.get("apply_b_dec_to_input", True):  # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = (b_enc.double() + b_dec.double() @ W_enc.double()).to(b_enc.dtype)
    activation = SAELENS_ACTIVATIONS[architecture]
    sae_cfg = SAEConfig(d_in=d_in, n_features=d_sae, activation=activation, k=int(cfg.get("k", 32)),
                        dtype=_dtype_name(W_enc.dtype, path), normalize_activations=normalization)  # fmt: skip
    sae = _build(sae_cfg, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}, path)
    with torch.no_grad():
        if activation == "jumprelu":
            sae.threshold.copy_(tensors["threshold"].clamp_min(0))  # codes are ReLU'd first: below 0 acts as 0
        if activation == "batchtopk" and "threshold" in tensors:
            sae.batchtopk_threshold.copy_(_single_threshold(tensors["threshold"], path))
    return sae.to(device)


def save_saelens(sae: SparseAutoencoder, path: str | os.PathLike) -> None:
    """A SAELens directory; BatchTopK is written as SAELens writes a trained one for inference, a
    JumpReLU SAE at its inference threshold (every feature the same)."""
    path = Path(path)
    _refuse_whitening(sae, "SAELens")
    activation = sae.cfg.activation
    tensors = _weights(sae)
    cfg = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.n_features, "dtype": _dtype_name(sae.W_enc.dtype, path),
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": sae.cfg.normalize_activations,
           "reshape_activations": "none", "meta": {}}  # fmt: skip
    if activation == "topk":
        cfg.update(architecture="topk", k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    elif activation == "relu":
        cfg["architecture"] = "standard"
    else:
        cfg["architecture"] = "jumprelu"
        if activation == "jumprelu":
            tensors["threshold"] = sae.threshold.detach().cpu().contiguous()
        else:
            threshold = float(sae.batchtopk_threshold)
            if threshold < 0:
                raise ValueError("a BatchTopK SAE saves to SAELens with its inference threshold, which is set by "
                                 "training; this one has not been trained")  # fmt: skip
            tensors["threshold"] = torch.full((sae.cfg.n_features,), threshold, dtype=sae.W_enc.dtype)
    _write_directory(path, "sae_weights.safetensors", tensors, cfg)


# ---------------------------------------------------------------------------------------------------
# sparsify


def load_sparsify(path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    path = Path(path)
    cfg = _read_json(path / "cfg.json")
    tensors = _read_weights(path / "sae.safetensors", cfg)
    for flag, what in (("transcode", "a transcoder"), ("skip_connection", "a skip connection")):
        if cfg.get(flag):
            raise ValueError(f"{path}: {what} ({flag}=true) is not a sparse autoencoder fastsae computes")
    _require(path, tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
    W_enc = tensors["encoder.weight"].T.contiguous()
    d_in, n_features = W_enc.shape
    # sparsify's num_latents 0 means expansion_factor * d_in features
    latents = cfg.get("num_latents") or (cfg["expansion_factor"] * d_in if cfg.get("expansion_factor") else None)
    _check_sizes(path, {"d_in": cfg.get("d_in"), "features": latents}, {"d_in": d_in, "features": n_features})
    if "k" not in cfg:
        raise ValueError(f"{path}/cfg.json has no k")
    sae_cfg = SAEConfig(d_in=d_in, n_features=n_features, activation="topk", k=int(cfg["k"]),
                        dtype=_dtype_name(W_enc.dtype, path))  # fmt: skip
    weights = {"W_enc": W_enc, "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    return _build(sae_cfg, weights, path).to(device)


def save_sparsify(sae: SparseAutoencoder, path: str | os.PathLike) -> None:
    """A sparsify SparseCoder directory (TopK SAEs only: sparsify has no other activation)."""
    path = Path(path)
    if sae.cfg.activation != "topk":
        raise ValueError(f"sparsify SAEs are TopK; this one is {sae.cfg.activation!r} (save it as saelens)")
    _refuse_whitening(sae, "sparsify")
    if sae.cfg.normalize_activations != "none":
        raise ValueError("sparsify SAEs read their activations as they are: save this layer_norm SAE as saelens")
    d, n_features = sae.cfg.d_in, sae.cfg.n_features
    weights = _weights(sae)
    tensors = {"encoder.weight": weights["W_enc"].T.contiguous(), "encoder.bias": weights["b_enc"],
               "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}  # fmt: skip
    cfg = {"expansion_factor": max(1, n_features // d), "normalize_decoder": True, "num_latents": n_features,
           "k": sae.cfg.k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d}  # fmt: skip
    _write_directory(path, "sae.safetensors", tensors, cfg)


# ---------------------------------------------------------------------------------------------------
# Shared


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON config: {error}") from error
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not a JSON object")
    return cfg


def _check_sizes(path: Path, stated: dict[str, object], sizes: dict[str, int]) -> None:
    """The sizes cfg.json states (None: not stated) are the weights': a config and weights of two
    different SAEs in one directory are refused, not loaded as the weights' SAE under the config's k."""
    stated = {key: value for key, value in stated.items() if value is not None}
    if any(value != sizes[key] for key, value in stated.items()):
        raise ValueError(f"{path}/cfg.json states {stated} but the weights have {sizes}: not the same SAE")


def _require(path: Path, tensors: dict[str, Tensor], names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{path}: the weights file lacks {missing} (has {sorted(tensors)})")


def _dtype_name(dtype: torch.dtype, path: Path) -> str:
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"{path}: weights of dtype {dtype} (fastsae takes {sorted(DTYPES)})")


def _build(cfg: SAEConfig, weights: dict[str, Tensor], path: Path) -> SparseAutoencoder:
    """A fastsae SAE holding `weights` (checked against the config's shapes), statistics reset."""
    sae = SparseAutoencoder(cfg, draw_directions=not {"W_enc", "W_dec"} <= weights.keys())
    expected = sae.state_dict()
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    sae.load_state_dict({**expected, **{name: t.to(expected[name].dtype) for name, t in weights.items()}})
    return sae


def _weights(sae: SparseAutoencoder) -> dict[str, Tensor]:
    return {name: getattr(sae, name).detach().cpu().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def _single_threshold(threshold: Tensor, path: Path) -> Tensor:
    if not torch.all(threshold == threshold.flatten()[0]):
        raise ValueError(f"{path}: a BatchTopK SAE with per-feature thresholds (load it as jumprelu instead)")
    return threshold.flatten()[0].float()


def _refuse_whitening(sae: SparseAutoencoder, library: str) -> None:
    if sae.cfg.centering == "whiten":
        raise ValueError(f"a whitened SAE's input transform has no place in a {library} checkpoint")


def _write_directory(path: Path, weights_name: str, tensors: dict[str, Tensor], cfg: dict) -> None:
    """The weights, then cfg.json, each written atomically into `path` (created if needed). The weights
    file carries the config too (its metadata, which the libraries ignore), so that a save cut between
    the two files, its new weights beside the last save's cfg.json, is refused (`_read_weights`) rather
    than loaded under the other config's k or architecture."""
    path.mkdir(parents=True, exist_ok=True)
    metadata = {SAVED_CONFIG: json.dumps(cfg, sort_keys=True)}
    write_atomically(path / weights_name, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_atomically(path / "cfg.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"))


def _read_weights(path: Path, cfg: dict) -> dict[str, Tensor]:
    """The tensors of a SAELens or sparsify weights file, after checking that the config fastsae wrote
    into it, where it did (`_write_directory`), is cfg.json's."""
    metadata, tensors = read_safetensors(path)
    if SAVED_CONFIG in metadata and json.loads(metadata[SAVED_CONFIG]) != cfg:
        raise ValueError(f"{path} was saved with another cfg.json than the one beside it (a save cut between "
                         "the two files?): not loaded")  # fmt: skip
    return tensors
