"""MoE core: expert stacks, routers, losses, dispatch ops and the :class:`MoE` layer."""

from moelab.moe import dispatch, losses, routers
from moelab.moe.condconv import CondConv2d
from moelab.moe.conv_blocks import ConvBlockExperts
from moelab.moe.experts import Experts, MLPExperts, ModuleExperts
from moelab.moe.layer import MoE, MoEAux
from moelab.moe.routers import ROUTERS, make_router, update_router_biases
from moelab.moe.token_moe2d import TokenMoE2d

__all__ = ["MoE", "MoEAux", "Experts", "MLPExperts", "ModuleExperts", "ConvBlockExperts",
           "CondConv2d", "TokenMoE2d", "ROUTERS", "make_router", "update_router_biases", "routers", "losses",
           "dispatch"]
