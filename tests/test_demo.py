import json
import re

from dyncnn.demo import run_demo


def test_demo_runs_end_to_end(tmp_path):
    """One epoch, short timings: the pipeline, not the figures (those are in the report)."""
    out = run_demo(tmp_path, epochs=1, threads=1, rounds=3, single_images=8)
    report = (tmp_path / "report.md").read_text()
    assert re.search(r"runs \d+\.\d\dx (faster|slower) than the static front at equal accuracy", report)
    assert "leave at the first" in report
    for name in ("frontier.png", "exit_histogram.png", "easy_hard.png", "training.png", "accuracy_by_scale.png"):
        assert (tmp_path / name).stat().st_size > 1000
    saved = json.loads((tmp_path / "frontier.json").read_text())
    seed = saved["seeds"][0]
    assert set(seed["static"]) == {"tiny-S /4", "tiny-M /2", "tiny-M"}
    assert out["selected"] in seed["dynamic"] and len(out["exit_index"]) == 3000
    chosen = next(p for p in seed["dynamic"][out["selected"]]["points"] if p["chosen"])
    # the eager cascade rebuilt from the checkpoints takes the decisions the bundle took on the test split
    fractions = [float((out["exit_index"] == k).double().mean()) for k in range(len(chosen["test_exit_fractions"]))]
    assert fractions == chosen["test_exit_fractions"]
