"""``threads="adaptive"``: every run of a bundle on the thread plan whose recent runs of its size ran fastest
(:class:`dyncnn.export.runtime.AdaptiveChoice`), against fake run times, and the bundle it drives deciding as eager
and as one fixed count."""
import numpy as np
import pytest
import torch

import dyncnn
from dyncnn.dynamic.executor import ExitResult
from dyncnn.export import BundleError, export_bundle, load_bundle
from dyncnn.export.bundle_format import ADAPTIVE_COUNTS
from dyncnn.export.runtime import AdaptiveChoice, record_stage_threads, thread_plan


def _runs(choice, n, cost, rows=1):
    """``n`` runs of ``rows`` rows, arm ``i`` taking ``cost(i)`` seconds; the arms taken."""
    taken = []
    for _ in range(n):
        g, i = choice.choose(rows)
        choice.record(g, i, cost(i))
        taken.append(i)
    return taken


def test_it_follows_the_faster_arm_when_the_machine_changes():
    costs = {0: 1.6, 1: 1.0}                       # 2 threads faster, then slow (a spell), then fast again
    choice = AdaptiveChoice(2, prior=lambda rows: 0)   # starts on the recorded plan: 1 thread
    _runs(choice, 40, costs.get)
    assert choice.current(1) == 1                  # found within the first tries
    taken = _runs(choice, 640, costs.get)
    assert taken.count(0) <= 640 // AdaptiveChoice.EXPLORE_SLOW + 1   # the slower arm only tried, 1 run in 64
    costs[1] = 3.0                                 # the second core is taken
    taken = _runs(choice, 16, costs.get)           # seen at the next look at the medians, every DECIDE runs
    assert choice.current(1) == 0 and taken[-6:] == [0] * 6
    costs[1] = 1.0                                 # and given back: seen at the next tries, one run in 16 or 64
    _runs(choice, AdaptiveChoice.EXPLORE_SLOW * AdaptiveChoice.WINDOW, costs.get)
    assert choice.current(1) == 1
    assert sum(choice.ran) == 40 + 640 + 16 + AdaptiveChoice.EXPLORE_SLOW * AdaptiveChoice.WINDOW


def test_close_arms_are_tried_more_often_and_one_slow_run_does_not_switch():
    costs = {0: 1.0, 1: 1.1}
    choice = AdaptiveChoice(2, prior=lambda rows: 1)   # recorded 2 threads, 1 thread 10% faster here
    taken = _runs(choice, 320, costs.get)
    assert choice.current(1) == 0
    tries = taken[40:].count(1)                    # after the first tries: one run in EXPLORE
    assert 280 // AdaptiveChoice.EXPLORE - 1 <= tries <= 280 // AdaptiveChoice.EXPLORE + 1
    _runs(choice, 1, lambda i: 50.0)               # one run 50x slower (a pause, cold caches)...
    assert choice.current(1) == 0                  # ...is not a change of the machine: the median of the window


def test_recorded_times_seed_the_first_choices():
    costs = {0: 1.0, 1: 2.0}
    seeded = AdaptiveChoice(2, seed=lambda rows: [1.0, 2.0])
    assert _runs(seeded, 63, costs.get).count(1) == 0   # recorded 2x slower: first tried at the 64th run
    assert _runs(seeded, 1, costs.get) == [1]
    costs[0] = 3.0                                 # 1 thread slowed since the recording: 2 threads within runs
    _runs(seeded, 8, costs.get)
    assert seeded.current(1) == 1
    assert _runs(AdaptiveChoice(2), 4, costs.get) == [0, 0, 0, 1]   # nothing recorded: the other arm tried early


def test_groups_of_rows_choose_apart():
    choice = AdaptiveChoice(2)                     # one image: 1 thread faster; 64 images: 2 threads faster
    _runs(choice, 60, (1.0, 1.5).__getitem__, rows=1)
    _runs(choice, 60, (64.0, 36.0).__getitem__, rows=64)
    assert (choice.current(1), choice.current(64), choice.current(100)) == (0, 1, 1)   # 100: the group 64-127
    assert choice.current(40) is None                                               # 32-63: not run yet
    assert _runs(AdaptiveChoice(1), 20, lambda i: 1.0) == [0] * 20                   # one arm: always it
    with pytest.raises(ValueError, match="at least one arm"):
        AdaptiveChoice(0)


def _cat(parts):
    return ExitResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logits", "exit_index", "macs")))


def test_an_adaptive_bundle_decides_as_eager_and_as_one_thread(multi):
    model, policy, folder = multi
    bundle = load_bundle(folder, threads="adaptive")
    assert bundle.plans == [(1, 1, 1), (2, 2, 2)]  # nothing recorded: every count everywhere
    for k, step in enumerate(bundle._steps):       # a session per count in every stage
        assert sorted(bundle._by_count[k]) == list(ADAPTIVE_COUNTS)
        assert [s.get_session_options().intra_op_num_threads for s in bundle._by_count[k].values()] == [1, 2]
    x = torch.rand(40, 1, 32, 32)
    want = model.infer(x, policy)
    fixed = load_bundle(folder, threads=1)
    for got in (bundle.run(x), _cat([bundle.run(x[i:i + 1]) for i in range(40)])):
        assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.macs, want.macs)
        torch.testing.assert_close(got.logits, fixed.run(x).logits, rtol=1e-5, atol=1e-5)
    assert sum(bundle.choice.ran) == 41            # one choice per run: the batch and the 40 single images
    assert bundle.choice.ran[1] >= 1               # 2 threads tried within the first runs
    used = {bundle._steps[0].sess.get_session_options().intra_op_num_threads}
    assert used <= set(ADAPTIVE_COUNTS)


def test_it_starts_from_the_recorded_plans(multi, tmp_path):
    _, policy, folder = multi
    assert thread_plan({"kind": "multi_exit"}, 3, "adaptive") == [[(0.0, 1)]] * 3      # nothing recorded: 1
    measured = {1: {1: [0.1, 0.1, 0.1], 2: [0.2, 0.05, 0.2]}, 16: {1: [0.1, 0.1, 0.1], 2: [0.05, 0.2, 0.05]}}
    record_stage_threads(folder, measured)          # batch 1: 1, 2, 1 threads; batch 16: 2, 1, 2
    bundle = load_bundle(folder, threads="adaptive")
    assert bundle.plans == [(1, 1, 1), (2, 2, 2), (1, 2, 1), (2, 1, 2)]
    assert bundle.choice._prior(1) == 2 and bundle.choice._prior(16) == 3
    bundle.run_numpy(np.random.rand(1, 1, 32, 32).astype(np.float32), bundle.full_depth())
    assert [s.sess.get_session_options().intra_op_num_threads for s in bundle._steps] == [1, 2, 1]
    bundle.run_numpy(np.random.rand(16, 1, 32, 32).astype(np.float32), bundle.full_depth())
    assert [s.sess.get_session_options().intra_op_num_threads for s in bundle._steps] == [2, 1, 2]
    # the whole-run times recorded for the plans seed the group of their batch size (seconds per run)
    record_stage_threads(folder, measured, plans={(1, 1, 1): 0.3, (2, 2, 2): 0.6})
    seeded = load_bundle(folder, threads="adaptive")
    assert seeded.plans == [(1, 1, 1), (2, 2, 2), (2, 1, 2)]
    assert seeded.choice._seed(1) == [pytest.approx(3e-4), pytest.approx(6e-4), None]
    assert seeded.choice._seed(64) == [None] * 3


def test_adaptive_needs_an_onnx_runtime_bundle_of_stages(tmp_path):
    net = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 8, 8, 8]).eval()
    export_bundle(net, tmp_path / "s", (1, 32, 32))
    static = load_bundle(tmp_path / "s", threads="adaptive")
    assert static.plans == [(1,), (2,)]
    x = np.random.rand(3, 1, 32, 32).astype(np.float32)
    np.testing.assert_allclose(static.run_numpy(x), load_bundle(tmp_path / "s").run_numpy(x), rtol=1e-5, atol=1e-5)
    record_stage_threads(tmp_path / "s", {4: {1: [2.0], 2: [1.0]}})     # ms per call of 4 rows
    seeded = load_bundle(tmp_path / "s", threads="adaptive")
    assert seeded.choice._seed(5) == [pytest.approx(2e-3 * 5 / 4), pytest.approx(1e-3 * 5 / 4)]
    assert seeded.choice._prior(4) == 1
    with pytest.raises(BundleError, match="'per-stage', 'adaptive' or one count per stage"):
        load_bundle(tmp_path / "s", threads="fastest")
