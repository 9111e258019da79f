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


def test_the_report_names_the_selection_rule_of_the_run():
    results = _results(1.2, 1.2)
    assert "(the cheapest whose validation accuracy reaches the best static model's)" in render_markdown(results)
    results["settings"]["selection_z"] = 1.0
    assert ("less 1 standard error of its paired difference from the best static model's, still reaches it)"
            in render_markdown(results))
    results["settings"]["cascade_last"] = "reference"
    assert ("still reaches it; the searched cascades end with the best static model)" in render_markdown(results))


def test_the_load_average_has_two_decimals():
    text = render_markdown(_results(1.2, 1.2))
    assert "load average at the end 1.23, 0.50, 0.25," in text and "1.2345" not in text
    assert "load average at the end unknown," in render_markdown(_results(1.2, 1.2, load=None))


def test_progress_lines_name_the_step_its_seconds_and_the_time_left(monkeypatch):
    import dyncnn.frontier.runner as runner
    now = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: now[0])
    lines = []
    progress = runner._Progress(3, lines.append)
    for t, name in ((10.0, "tiny-S /4: trained"), (30.0, "tiny-M /2: trained"), (60.0, "tiny-M: reused")):
        now[0] = t
        progress.step(name)
    assert lines == ["    tiny-S /4: trained in 10.0 s (1 of 3, about 20 s left)",
                     "    tiny-M /2: trained in 20.0 s (2 of 3, about 15 s left)",
                     "    tiny-M: reused in 30.0 s (3 of 3)"]
    assert [runner._duration(s) for s in (42.4, 185, 3720)] == ["42 s", "3 min 5 s", "1 h 2 min"]


def test_timing_logs_a_line_per_condition_and_draws_no_bar_off_a_terminal(capsys):
    """A log file (stderr not a terminal) gets the progress lines and no tqdm bars."""
    import numpy as np

    from dyncnn.frontier.runner import FrontierSettings, Timed, time_interleaved
    s = FrontierSettings(seeds=(0,), threads=(1,), batch_sizes=(1, 4), rounds=3, single_images=2, batch_images=8)
    items = [Timed(k, lambda threads: (lambda x: x.sum())) for k in ("a", "b")]
    lines = []
    out = time_interleaved(items, np.zeros((8, 1, 4, 4), np.float32), s, "ORT", log=lines.append)
    assert set(out["a"]) == set(out["b"]) == {"t1_b1", "t1_b4"}
    assert capsys.readouterr().err == ""
    assert len(lines) == 2
    assert re.fullmatch(r"    ORT batch 1, 1 thread: 2 models timed in \d+\.\d s \(1 of 2, about \d+ s left\)",
                        lines[0]), lines
    assert lines[1].startswith("    ORT batch 4, 1 thread: 2 models timed in ") and lines[1].endswith("(2 of 2)")


def test_readme_names_the_networks_the_demo_trains():
    """README's `make demo` line says which static networks the demo trains: those of the "demo" preset."""
    from pathlib import Path

    from dyncnn.frontier.runner import presets
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("make demo   #")
    comment = " ".join(ln.split("#", 1)[1].strip() for ln in readme[start:readme.index("make test", start)]
                       .splitlines())
    expected = [f"{spec['label'].split(' /')[0]} " + (f"on the {spec['factor']}x downsampled image"
                                                       if spec["factor"] > 1 else "at full resolution")
                for spec in presets(64)["demo"]["static"]]
    assert f"train a small static front ({', '.join(expected)})" in comment, comment
