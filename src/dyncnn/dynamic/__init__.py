"""The runtime of input-adaptive inference: conditional execution, exits, policies, budgets, and the gated
mechanisms (layer skipping, channel gating, pixel masks) built on them. Model families that use them live in
:mod:`dyncnn.models` (e.g. the routing super-network in :mod:`dyncnn.models.routing`)."""
from .evaluation import evaluate_dynamic
from .executor import CostLedger, ExitResult, Executor, early_exit_inference
from .exits import (Cascade, ConvHead, ExitLogits, ForwardTransfer, LinearHead, MultiExitNetwork, TransferStage,
                    attach_exits)
from .imta import IMTA, apply_imta
from .losses import MultiExitLoss
from .patches import crop_patches, crop_patches_differentiable
from .policy import ExitPolicy, confidence
from .protocols import (AuxLoss, DynamicModel, EarlyExitModel, Forceable, HasExits, OwnTrainingLoss,
                        ProgressAware, ResidualBranchBlock, forced, is_gated)
from .skipping import FeedForwardGate, LayerSkipNetwork, RecurrentGate, backbone_parts, is_skippable
from .spatial import SparseExportError, gated_branch, sparse_block_forward
from .width import ChannelGatedNet, recalibrate_norms

__all__ = ["CostLedger", "ExitResult", "Executor", "early_exit_inference", "MultiExitNetwork", "attach_exits",
           "Cascade", "LinearHead", "ConvHead", "ForwardTransfer", "TransferStage", "ExitLogits", "IMTA", "apply_imta",
           "MultiExitLoss", "ExitPolicy", "confidence", "evaluate_dynamic", "is_gated",
           "AuxLoss", "DynamicModel", "EarlyExitModel", "Forceable", "forced", "HasExits", "OwnTrainingLoss",
           "ProgressAware", "ResidualBranchBlock",
           "crop_patches", "crop_patches_differentiable",
           "FeedForwardGate", "LayerSkipNetwork", "RecurrentGate", "backbone_parts", "is_skippable",
           "SparseExportError", "gated_branch", "sparse_block_forward", "ChannelGatedNet", "recalibrate_norms"]
