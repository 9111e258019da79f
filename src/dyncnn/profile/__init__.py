"""Cost of a model: MACs and parameters (FlopCounterMode), latency (eager and ONNX Runtime), peak memory."""
from .latency import LatencyStats, measure_latency
from .macs import MacReport, count_macs, count_params, example_input
from .memory import peak_memory

__all__ = ["MacReport", "count_macs", "count_params", "example_input", "LatencyStats", "measure_latency",
           "peak_memory"]
