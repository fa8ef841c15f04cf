"""Feature absorption in a TopK SAE and in its Matryoshka version, on synthetic activations with a
hierarchy (CPU, about 5 s a seed):

    python -m bench.matryoshka_absorption --seeds 5

True features: PARENTS parent directions, each with CHILDREN child directions (random unit vectors in
d = D). A parent fires on a token with probability P_PARENT; where it fires, one of its children fires
too with probability P_CHILD (never without its parent), as "animal" under "dog". A plain SAE tends to
absorb the parent into its children's latents: the latent that reads the parent (its decoder row is the
closest to the parent's direction) stops firing where a child fires, since the child's latent already
carries the parent's direction. A Matryoshka SAE whose first PARENTS latents must reconstruct alone
(`matryoshka_widths=(PARENTS,)`) should keep the parent latent firing.

For each seed the two SAEs start from the same weights and see the same batches (paired); printed per
seed and as mean ± std: the parent latents' recall where a child fires (the fraction of those tokens on
which the parent's latent fires; absorption lowers it), where no child fires, and the FVU.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fastsae

D, PARENTS, CHILDREN = 32, 6, 4
P_PARENT, P_CHILD = 0.15, 0.35
N_TRUE = PARENTS * (1 + CHILDREN)


def activations(features: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, D], the true codes [n, N_TRUE]: parents first, then each parent's children)."""
    parent = torch.rand(n, PARENTS, generator=generator) < P_PARENT
    with_child = (torch.rand(n, PARENTS, generator=generator) < P_CHILD) & parent
    which = torch.randint(0, CHILDREN, (n, PARENTS), generator=generator)
    child = torch.zeros(n, PARENTS, CHILDREN, dtype=torch.bool).scatter(2, which[:, :, None], with_child[:, :, None])
    magnitude = 1 + 0.1 * torch.randn(n, N_TRUE, generator=generator)
    codes = torch.cat([parent, child.reshape(n, -1)], dim=1) * magnitude
    return codes @ features, codes


def train(seed: int, widths: tuple[int, ...], steps: int, batch: int) -> dict[str, float]:
    """A TopK SAE of N_TRUE latents (k = 4) trained `steps` Adam steps on seed `seed`'s activations."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(N_TRUE, D, generator=generator), dim=1)
    torch.manual_seed(seed)  # the SAE's random directions: the same for both variants
    cfg = fastsae.SAEConfig(d_in=D, n_features=N_TRUE, k=4, centering="none", dead_after_tokens=20_000,
                            matryoshka_widths=widths)  # fmt: skip
    sae = fastsae.SparseAutoencoder(cfg).initialize(activations(features, 2048, generator)[0])
    optimizer = fastsae.optim.SAEAdam(sae, lr=3e-3)
    for _ in range(steps):
        sae(activations(features, batch, generator)[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    sae.eval()
    x, codes = activations(features, 20_000, generator)
    with torch.no_grad():
        sparse = sae.encode(x)
        fired = torch.zeros(x.shape[0], N_TRUE, dtype=torch.bool).scatter(1, sparse.idx.long(), sparse.vals > 0)
        closest = (features[:PARENTS] @ sae.W_dec.T).argmax(dim=1)  # each parent's latent
        fvu = float(sae(x).fvu)
    with_child, without_child = [], []
    for parent in range(PARENTS):
        parent_on = codes[:, parent] > 0
        child_on = codes[:, PARENTS + parent * CHILDREN : PARENTS + (parent + 1) * CHILDREN].gt(0).any(dim=1)
        latent_on = fired[:, closest[parent]]
        with_child.append(float(latent_on[child_on].float().mean()))
        without_child.append(float(latent_on[parent_on & ~child_on].float().mean()))
    return {"with child": statistics.mean(with_child), "without child": statistics.mean(without_child), "fvu": fvu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    variants = {"TopK": (), "Matryoshka": (PARENTS,)}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for seed in range(args.seeds):
        for name, widths in variants.items():
            results[name].append(train(seed, widths, args.steps, args.batch))
            row = results[name][-1]
            print(f"seed {seed} {name:>10}: parent recall with a child {row['with child']:.3f}, "
                  f"without {row['without child']:.3f}; FVU {row['fvu']:.4f}", flush=True)  # fmt: skip
    print("\n| SAE | parent latent's recall where a child fires | where none does | FVU |\n|---|---|---|---|")
    for name, rows in results.items():
        cells = []
        for key in ("with child", "without child", "fvu"):
            values = [row[key] for row in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
