"""bench/matryoshka_absorption.py: its hierarchy (a child only with its parent) and a short paired run."""

import torch

from bench import matryoshka_absorption as absorption


def test_children_fire_only_with_their_parent_and_one_at_a_time():
    features = torch.nn.functional.normalize(torch.randn(absorption.N_TRUE, absorption.D), dim=1)
    x, codes = absorption.activations(features, 4096, torch.Generator().manual_seed(0))
    parents = codes[:, : absorption.PARENTS] > 0
    children = (codes[:, absorption.PARENTS :] > 0).view(-1, absorption.PARENTS, absorption.CHILDREN)
    assert not (children.any(dim=2) & ~parents).any() and (children.sum(dim=2) <= 1).all()
    assert 0.1 < float(parents.float().mean()) < 0.2 and children.any()
    torch.testing.assert_close(x, codes @ features)


def test_a_short_run_scores_both_saes():
    rows = [absorption.train(0, widths, steps=20, batch=256) for widths in ((), (absorption.PARENTS,))]
    for row in rows:
        assert 0 <= row["with child"] <= 1 and 0 <= row["without child"] <= 1 and 0 < row["fvu"] < 2
    assert rows[0] != rows[1], "the Matryoshka prefix changed nothing"
