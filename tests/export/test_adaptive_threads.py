"""``threads="adaptive"``: each stage on a session per thread count, every call on the count whose recent calls of
its size ran fastest (:class:`dyncnn.export.runtime.AdaptiveSession`), against a fake clock, and the bundle it
drives deciding as eager and as one fixed count."""
import numpy as np
import pytest
import torch

import dyncnn
from dyncnn.dynamic.executor import ExitResult
from dyncnn.export import BundleError, export_bundle, load_bundle
from dyncnn.export.bundle_format import ADAPTIVE_COUNTS
from dyncnn.export.runtime import AdaptiveSession, record_stage_threads, thread_plan


class _Machine:
    """Fake sessions whose call costs ``cost[count index]`` seconds of a fake clock (per group of rows)."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def clock(self):
        return self.now

    def run(self, i):
        def call(names, feed, opts):
            self.now += self.cost(i, len(next(iter(feed.values()))))
            return [i]
        return call

    def session(self, prior=0):
        return AdaptiveSession((1, 2), [self.run(0), self.run(1)], lambda rows: prior, clock=self.clock)


def _calls(sess, n, rows=1):
    feed = {"in0": np.zeros((rows, 3), dtype=np.float32)}
    return [sess.run(["out"], feed)[0] for _ in range(n)]


def test_it_follows_the_faster_count_when_the_machine_changes():
    costs = {0: 1.6, 1: 1.0}                       # 2 threads faster, then slow (a spell), then fast again
    m = _Machine(lambda i, rows: costs[i])
    sess = m.session(prior=0)                      # starts on the recorded count: 1 thread
    _calls(sess, 40)
    assert sess.current(1) == 2                    # found within the first tries
    ran = _calls(sess, 640)
    assert ran.count(0) <= 640 // AdaptiveSession.EXPLORE_SLOW + 1   # the slower count only tried, 1 call in 64
    costs[1] = 3.0                                 # the second core is taken
    ran = _calls(sess, 16)                         # seen at the next look at the medians, every DECIDE calls
    assert sess.current(1) == 1 and ran[-6:] == [0] * 6
    costs[1] = 1.0                                 # and given back: seen at the next tries, one call in 16 or 64
    _calls(sess, AdaptiveSession.EXPLORE_SLOW * AdaptiveSession.WINDOW)
    assert sess.current(1) == 2
    assert sum(sess.ran) == 40 + 640 + 16 + AdaptiveSession.EXPLORE_SLOW * AdaptiveSession.WINDOW


def test_close_counts_are_tried_more_often_and_one_slow_call_does_not_switch():
    costs = {0: 1.0, 1: 1.1}
    m = _Machine(lambda i, rows: costs[i])
    sess = m.session(prior=1)                      # recorded 2 threads, 1 thread 10% faster here
    ran = _calls(sess, 320)
    assert sess.current(1) == 1
    tries = ran[40:].count(1)                      # after the first tries: one call in EXPLORE
    assert 280 // AdaptiveSession.EXPLORE - 1 <= tries <= 280 // AdaptiveSession.EXPLORE + 1
    costs[0] = 50.0                                # one call 50x slower (a pause, cold caches)...
    _calls(sess, 1)
    costs[0] = 1.0
    assert sess.current(1) == 1                    # ...is not a change of the machine: the median of the window


def test_recorded_times_seed_the_first_choices():
    costs = {0: 1.0, 1: 2.0}
    m = _Machine(lambda i, rows: costs[i])
    seeded = AdaptiveSession((1, 2), [m.run(0), m.run(1)], lambda rows: 0, clock=m.clock,
                             seed=lambda rows: [1.0, 2.0])
    assert _calls(seeded, 63).count(1) == 0        # recorded 2x slower: first tried at the 64th call
    assert _calls(seeded, 1) == [1]
    costs[0] = 3.0                                 # 1 thread slowed since the recording: 2 threads within calls
    _calls(seeded, 8)
    assert seeded.current(1) == 2
    unseeded = m.session(prior=0)
    assert _calls(unseeded, 4) == [0, 0, 0, 1]     # nothing recorded: the other count tried early


def test_groups_of_rows_choose_apart():
    # one image: 1 thread faster; 64 images: 2 threads faster
    m = _Machine(lambda i, rows: (1.0, 1.5)[i] if rows == 1 else (64.0, 36.0)[i])
    sess = m.session(prior=0)
    _calls(sess, 60, rows=1)
    _calls(sess, 60, rows=64)
    assert (sess.current(1), sess.current(64), sess.current(100)) == (1, 2, 2)   # 100 rows: the group of 64-127
    assert sess.current(40) is None                                             # 32-63: not run yet
    assert sess.current(5) is None
    with pytest.raises(ValueError, match="one run per count"):
        AdaptiveSession((1, 2), [m.run(0)], lambda rows: 0)


def test_an_adaptive_bundle_decides_as_eager_and_as_one_thread(multi):
    model, policy, folder = multi
    bundle = load_bundle(folder, threads="adaptive")
    for step in bundle._steps:                     # a session per count in every stage, none spinning on
        assert isinstance(step.sess, AdaptiveSession) and step.more == ()
        assert [s.get_session_options().intra_op_num_threads for s in step.sess.sessions] == list(ADAPTIVE_COUNTS)
    x = torch.rand(40, 1, 32, 32)
    want = model.infer(x, policy)
    fixed = load_bundle(folder, threads=1)
    for got in (bundle.run(x), _cat([bundle.run(x[i:i + 1]) for i in range(40)])):
        assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.macs, want.macs)
        torch.testing.assert_close(got.logits, fixed.run(x).logits, rtol=1e-5, atol=1e-5)
    assert sum(bundle._steps[0].sess.ran) == 41              # the batch and the 40 single images
    last = int((want.exit_index == 2).sum())
    assert sum(bundle._steps[-1].sess.ran) == (last > 0) + last   # only what got there


def _cat(parts):
    return ExitResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("logits", "exit_index", "macs")))


def test_it_starts_from_the_recorded_counts(multi):
    _, _, folder = multi
    assert thread_plan({"kind": "multi_exit"}, 3, "adaptive") == [[(0.0, 1)]] * 3      # nothing recorded: 1
    measured = {1: {1: [0.1, 0.1, 0.1], 2: [0.2, 0.05, 0.2]}, 16: {1: [0.1, 0.1, 0.1], 2: [0.05, 0.2, 0.05]}}
    record_stage_threads(folder, measured)          # batch 1: 1, 2, 1 threads; batch 16: 2, 1, 2
    bundle = load_bundle(folder, threads="adaptive")
    bundle.run_numpy(np.random.rand(1, 1, 32, 32).astype(np.float32), bundle.full_depth())
    bundle.run_numpy(np.random.rand(16, 1, 32, 32).astype(np.float32), bundle.full_depth())
    assert [s.sess.current(1) for s in bundle._steps] == [1, 2, 1]
    assert [s.sess.current(16) for s in bundle._steps] == [2, 1, 2]


def test_adaptive_needs_an_onnx_runtime_bundle_of_stages(tmp_path):
    net = dyncnn.create_model("tiny_mobilenet", num_classes=10, in_chans=1, widths=[8, 8, 8, 8]).eval()
    export_bundle(net, tmp_path / "s", (1, 32, 32))
    static = load_bundle(tmp_path / "s", threads="adaptive")
    x = np.random.rand(3, 1, 32, 32).astype(np.float32)
    np.testing.assert_allclose(static.run_numpy(x), load_bundle(tmp_path / "s").run_numpy(x), rtol=1e-5, atol=1e-5)
    assert isinstance(static.sess, AdaptiveSession)
    with pytest.raises(BundleError, match="'per-stage', 'adaptive' or one count per stage"):
        load_bundle(tmp_path / "s", threads="fastest")
