"""moelab: Mixture-of-Experts for image classification in PyTorch."""

from moelab.models.conv_experts import ConvExperts
from moelab.moe import MLPExperts, ModuleExperts, MoE, MoEAux, losses, make_router

__version__ = "0.1.0"

__all__ = ["MoE", "MoEAux", "MLPExperts", "ModuleExperts", "ConvExperts", "make_router", "losses", "__version__"]
