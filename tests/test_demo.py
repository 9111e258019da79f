import json

from dyncnn.demo import run_demo


def test_demo_runs_end_to_end(tmp_path):
    """One epoch, no naive network, short timings: the pipeline, not the figures (those are in the report)."""
    out = run_demo(tmp_path, epochs=1, threads=1, naive=False, min_time_s=0.0)
    report = (tmp_path / "report.md").read_text()
    assert "MSDNet, full depth" in report and "budget 50%" in report
    # the thread count is stated, and the static row says what its ratios compare it with
    assert "Timings: eager PyTorch, 1 thread," in report and "MACs: full depth / this" in report
    assert "The static row compares a separate static network with MSDNet at full depth" in report
    for name in ("accuracy_vs_macs.png", "exit_histogram.png", "easy_hard.png", "training.png"):
        assert (tmp_path / name).stat().st_size > 1000
    rows = out["rows"]["MSDNet"]
    full = rows[0]
    assert full["exit_histogram"][-1] == 1000                       # full depth: everyone at the last exit
    for r in rows[1:]:
        assert r["mean_macs"] < full["mean_macs"] and sum(r["exit_histogram"]) == 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["curves"]["MSDNet"]) == 39
