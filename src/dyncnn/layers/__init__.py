"""Building blocks of mobile CNNs, one concept per module."""
from .activations import HardSigmoid, HardSwish, get_act_layer
from .conv import ConvNormAct, DepthwiseSeparableConv, GroupConv2d, make_divisible
from .shuffle import ChannelShuffle, channel_shuffle, channel_unshuffle
from .learned_group import CondensedGroupConv, CondensedLinear, ConversionError, LearnedGroupConv, LearnedLinear
from .reactivation import CondensedReactivation, SparseFeatureReactivation
from .squeeze_excite import SqueezeExcite
from .dynamic_conv import AttentionScaledConv2d, CondConv2d, DynamicConv2d
from .weight_prediction import PredictedDepthwiseConv2d
from .deform import DeformConv2d
from .gates import HardGate, gumbel_sigmoid, gumbel_softmax
from .sparse_conv import Positions, dilate_mask, sparse_conv, sparse_conv2d
from .moe import ConvMoE, MoEConfig, Router, capacity_keep

__all__ = [
    "ConvNormAct", "DepthwiseSeparableConv", "GroupConv2d", "make_divisible",
    "ChannelShuffle", "channel_shuffle", "channel_unshuffle", "SqueezeExcite",
    "HardSigmoid", "HardSwish", "get_act_layer", "LearnedGroupConv", "CondensedGroupConv", "LearnedLinear",
    "CondensedLinear", "ConversionError", "SparseFeatureReactivation", "CondensedReactivation",
    "CondConv2d", "DynamicConv2d", "AttentionScaledConv2d", "PredictedDepthwiseConv2d", "DeformConv2d",
    "HardGate", "gumbel_sigmoid", "gumbel_softmax", "Positions", "dilate_mask", "sparse_conv", "sparse_conv2d",
    "ConvMoE", "MoEConfig", "Router", "capacity_keep",
]
