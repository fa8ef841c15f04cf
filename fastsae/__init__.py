"""fastsae: fast sparse autoencoders for PyTorch, and the centering that keeps their features alive."""

from . import evaluate, functional, graphs, optim
from ._ext import ext_info
from .centering import geometric_median
from .diagnostics import (
    DeathReport,
    Diagnosis,
    diagnose,
    effective_rank,
    measure_death,
    outlier_severity,
    predicted_death,
)
from .sae import SAEConfig, SAEOutput, SparseAutoencoder

__version__ = "0.1.0"

__all__ = [
    "DeathReport",
    "Diagnosis",
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "diagnose",
    "effective_rank",
    "evaluate",
    "ext_info",
    "functional",
    "geometric_median",
    "graphs",
    "measure_death",
    "optim",
    "outlier_severity",
    "predicted_death",
]
