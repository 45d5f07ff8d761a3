"""moelab: Mixture-of-Experts for image classification in PyTorch.

The library is :mod:`moelab.moe` (the layer, routers, experts, losses); the seed experiments' own pieces are
in :mod:`moelab.reproductions`, the experiment families in :mod:`moelab.experiments`."""

from moelab.moe import MLPExperts, ModuleExperts, MoE, MoEAux, losses, make_router

__version__ = "0.1.0"

__all__ = ["MoE", "MoEAux", "MLPExperts", "ModuleExperts", "make_router", "losses", "__version__"]
