"""Issue 27, the CLI's output: the frontier/demo report's wording and figures, and the README's demo description."""
import re

from dyncnn.frontier.report import headline, ratio_words, render_markdown


def _results(b1: float, b64: float, load=(1.23456789012, 0.5, 0.25)) -> dict:
    """The smallest results dict the report renders: one dynamic model at two conditions, no per-seed tables."""
    row = {"speedup_mean": b1, "speedup_min": b1 * 0.9, "speedup_max": b1 * 1.1, "accuracy_gap_mean": -0.001,
           "kept_mean": 0.8, "best_static_mean": 0.9, "within_0.3_points": True}
    return {"settings": {"runtime": "onnxruntime", "canvas": 64, "clutter": 2, "epochs": 5, "test_repeats": 3,
                         "rounds": 7},
            "machine": {"processor": "x86_64", "cpus": 2, "load_average": load, "torch": "2", "onnxruntime": "1"},
            "summary": {"selected": "cascade", "t1_b1": {"cascade": row},
                        "t1_b64": {"cascade": {**row, "speedup_mean": b64}}},
            "seeds": [], "seconds": 1.0}


def test_a_ratio_below_one_is_worded_as_slower():
    assert ratio_words(1.9) == "1.90x faster" and ratio_words(1.0) == "1.00x faster"
    assert ratio_words(0.53) == "1.89x slower"
    line = headline(_results(0.53, 1.25))
    assert "runs 1.89x slower than the static front" in line and "0.53x faster" not in line
    assert "Elsewhere: 1.25x faster at batch 64, 1 thread." in line
    assert "runs 1.25x faster than the static front" in headline(_results(1.25, 0.8))
    assert "Elsewhere: 1.25x slower at batch 64" in headline(_results(1.25, 0.8))


def test_the_load_average_has_two_decimals():
    text = render_markdown(_results(1.2, 1.2))
    assert "load average at the end 1.23, 0.50, 0.25," in text and "1.2345" not in text
    assert "load average at the end unknown," in render_markdown(_results(1.2, 1.2, load=None))
