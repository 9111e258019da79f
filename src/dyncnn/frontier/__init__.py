"""The accuracy-latency frontier: dynamic networks against the best static ones, timed in ONNX Runtime
or ExecuTorch.

- :mod:`.front`: the static Pareto front, its interpolation, the speedup at equal accuracy, selection on validation;
- :mod:`.runner`: training with one budget for all, calibration on validation, interleaved timing in the runtime
  (``dyncnn frontier``, ``benchmarks/bench_frontier.py``);
- :mod:`.report`: ``frontier.md`` and ``frontier.png``.
"""
from .front import (Point, Speedup, best_on_validation, front_latency_at, paired_lower_bound, pareto_front,
                    select_on_validation, speedup_at_equal_accuracy)

__all__ = ["Point", "Speedup", "pareto_front", "front_latency_at", "speedup_at_equal_accuracy",
           "select_on_validation", "best_on_validation", "paired_lower_bound", "FrontierSettings", "run_frontier"]


def __getattr__(name):          # the runner imports training and export: only when asked for
    if name in ("FrontierSettings", "run_frontier", "presets"):
        from . import runner
        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
