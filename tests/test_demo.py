import json
import re

import pytest

from dyncnn.demo import SCALE_NOTE, run_demo, verdict


@pytest.mark.parametrize("b1, b64, holds", [(1.2, 1.5, True), (0.86, 0.99, False), (1.3, 0.9, False)])
def test_verdict_says_whether_the_selected_model_is_faster_at_both_batch_sizes(b1, b64, holds):
    results = {"summary": {"selected": "cascade", "t1_b1": {"cascade": {"speedup_mean": b1}},
                           "t1_b64": {"cascade": {"speedup_mean": b64}}, "t2_b1": {"cascade": {"speedup_mean": 9}}}}
    line = verdict(results)
    assert f"{b1:.2f}x at batch 1, {b64:.2f}x at batch 64 (1 thread)" in line
    assert (": faster at each batch size" in line) == holds and (": not faster at each" in line) == (not holds)


def test_demo_runs_end_to_end(tmp_path, capsys):
    """One epoch, short timings: the pipeline, not the figures (those are in the report)."""
    out = run_demo(tmp_path, epochs=1, threads=1, rounds=3, single_images=8)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == SCALE_NOTE                 # says first what this scale cannot show, and why
    report = (tmp_path / "report.md").read_text()
    assert verdict(out["results"]) in report and verdict(out["results"]) in printed
    assert re.search(r"runs \d+\.\d\dx (faster|slower) than the static front at equal accuracy", report)
    assert "leave at the first" in report
    for name in ("frontier.png", "exit_histogram.png", "easy_hard.png", "training.png", "accuracy_by_scale.png"):
        assert (tmp_path / name).stat().st_size > 1000
    saved = json.loads((tmp_path / "frontier.json").read_text())
    seed = saved["seeds"][0]
    assert set(seed["static"]) == {"tiny-S /4", "tiny-M /2", "tiny-M", "tiny-L"}
    assert out["selected"] in seed["dynamic"] and len(out["exit_index"]) == 3000
    chosen = next(p for p in seed["dynamic"][out["selected"]]["points"] if p["chosen"])
    # the eager cascade rebuilt from the checkpoints takes the decisions the bundle took on the test split
    fractions = [float((out["exit_index"] == k).double().mean()) for k in range(len(chosen["test_exit_fractions"]))]
    assert fractions == chosen["test_exit_fractions"]
