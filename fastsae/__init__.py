"""fastsae: fast sparse autoencoders for PyTorch, and the centering that keeps their features alive."""

from . import functional
from ._ext import ext_info
from .centering import geometric_median
from .sae import SAEConfig, SAEOutput, SparseAutoencoder

__version__ = "0.1.0"

__all__ = [
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "ext_info",
    "functional",
    "geometric_median",
]
