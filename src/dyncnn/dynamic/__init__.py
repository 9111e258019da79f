"""The runtime of input-adaptive inference: conditional execution, exits, policies, budgets."""
from .executor import CostLedger, ExitResult, Executor, early_exit_inference
from .exits import Cascade, ConvHead, LinearHead, MultiExitNetwork, attach_exits
from .policy import ExitPolicy, confidence

__all__ = ["CostLedger", "ExitResult", "Executor", "early_exit_inference", "MultiExitNetwork", "attach_exits",
           "Cascade", "LinearHead", "ConvHead", "ExitPolicy", "confidence"]
