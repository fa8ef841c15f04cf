"""Training at different activation scales, with SAEAdam's biases stepping at the activations' scale
(`bias_lr_scale=fastsae.optim.activation_scale(...)`) and without (CPU, about 30 s):

    python -m bench.activation_scale

The README's example data (sparse combinations of 512 true features in d = 64, an outlier offset in
two dimensions) multiplied by each scale, a TopK SAE of 1024 features (k = 8) centred on a sample and
trained 400 steps at the README's rate; printed: the mean FVU of the last 20 steps. The same seed, so
the same directions and batches, at every scale and for both variants.
"""

from __future__ import annotations

import argparse

import torch

import fastsae

D_IN, N_TRUE = 64, 512


def train(scale: float, scaled_biases: bool, steps: int, seed: int = 0) -> float:
    torch.manual_seed(seed)
    true_features = torch.nn.functional.normalize(torch.randn(N_TRUE, D_IN), dim=1)
    offset = torch.zeros(D_IN)
    offset[:2] = 20.0

    def batch(size: int) -> torch.Tensor:
        codes = torch.rand(size, N_TRUE) * (torch.rand(size, N_TRUE) < 0.01)
        return scale * (codes @ true_features + offset + 0.01 * torch.randn(size, D_IN))

    sae = fastsae.SparseAutoencoder(fastsae.SAEConfig(d_in=D_IN, n_features=1024, k=8))
    sample = batch(4096)
    sae.initialize(sample)
    bias_lr_scale = fastsae.optim.activation_scale(sae, sample) if scaled_biases else 1.0
    optimizer = fastsae.optim.SAEAdam(sae, lr=2e-3, bias_lr_scale=bias_lr_scale)
    fvus = []
    for _ in range(steps):
        out = sae(batch(1024))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        fvus.append(float(out.fvu.detach()))
    return sum(fvus[-20:]) / 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.01, 1.0, 100.0])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    print("| activation scale | FVU, biases at the rate | FVU, biases at the rate x activation_scale |")
    print("|---|---|---|")
    for scale in args.scales:
        plain, scaled = (train(scale, scaled_biases, args.steps) for scaled_biases in (False, True))
        print(f"| {scale:g} | {plain:.4f} | {scaled:.4f} |", flush=True)


if __name__ == "__main__":
    main()
