import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based tests (hypothesis) run under a profile chosen by DYNCNN_HYPOTHESIS_PROFILE:
# - ci (default): few examples, derandomized: the same examples every run, seconds per test;
# - long: DYNCNN_HYPOTHESIS_EXAMPLES examples per test (default 2000) from random seeds, for a fuzzing session
#   (`DYNCNN_HYPOTHESIS_PROFILE=long pytest -s tests/test_property_inputs.py`: -s shows the examples run); a failure
#   prints the seed that reproduces it (@reproduce_failure) and is kept in .hypothesis/ to be replayed first.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, suppress_health_check=_QUIET)
settings.register_profile("long", max_examples=int(os.environ.get("DYNCNN_HYPOTHESIS_EXAMPLES", "2000")),
                          deadline=None, derandomize=False, print_blob=True, suppress_health_check=_QUIET)
HYPOTHESIS_PROFILE = os.environ.get("DYNCNN_HYPOTHESIS_PROFILE", "ci")
if HYPOTHESIS_PROFILE not in ("ci", "long"):
    raise pytest.UsageError(f"DYNCNN_HYPOTHESIS_PROFILE must be ci or long, got {HYPOTHESIS_PROFILE!r}")
settings.load_profile(HYPOTHESIS_PROFILE)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small test tensors: one thread is faster and steadier
    yield


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own empty cache folder (``dyncnn zoo`` caches there), never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def write_image_tree():
    """Writes a tiny ImageFolder tree ``ROOT/CLASS/IMAGE.png`` (no split folders): each class a colour (red, green,
    blue, ...) with noise, so that a few training steps can learn it. Returns ROOT."""
    import numpy as np
    from PIL import Image

    def write(root, classes=("red", "green", "blue"), per_class=8, size=24, seed=0):
        rng = np.random.default_rng(seed)
        for c, name in enumerate(classes):
            (root / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                img[..., c % 3] += 180
                Image.fromarray(img).save(root / name / f"{i}.png")
        return root
    return write


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory, write_image_tree):
    """3 classes x 8 images of 24x24 (see ``write_image_tree``)."""
    return write_image_tree(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def spread_policy():
    """``spread_policy(net, x)`` for a multi-exit network: thresholds halfway between the two middle confidences
    of each exit among the samples still present, so that the samples of ``x`` split over the exits, none near a
    threshold."""
    from dyncnn.dynamic import ExitPolicy

    def policy(net, x):
        with torch.no_grad():
            outs = net(x)
        left, thresholds = torch.ones(len(x), dtype=torch.bool), []
        for o in outs[:-1]:
            conf = torch.softmax(o, 1).max(1).values
            c = conf[left].sort().values
            thresholds.append(float(c[len(c) // 2 - 1:len(c) // 2 + 1].mean()))
            left &= conf < thresholds[-1]
        return ExitPolicy(thresholds)
    return policy


@pytest.fixture(scope="session")
def stage_rows(spread_policy):
    """``stage_rows(net, x)``: the :func:`spread_policy`, the ``infer`` result under it, and the batch rows each
    later stage ran on ({k: [rows]}, from forward pre-hooks): what "an exited sample never runs the later stages"
    is checked with."""

    def run(net, x):
        policy = spread_policy(net, x)
        net.infer(x, policy)        # the executor measures each stage's cost once per shape: not counted below
        seen = {k: [] for k in range(1, net.num_exits)}
        hooks = [net.stages[k].register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0][0].shape[0]))
                 for k in seen]
        try:
            r = net.infer(x, policy)
        finally:
            for h in hooks:
                h.remove()
        return policy, r, seen
    return run


@pytest.fixture(scope="session")
def check_later_stages_skipped(stage_rows):
    """``check_later_stages_skipped(net, x)`` for a multi-exit network: with every stage and head after the first
    NaN-poisoned, samples that all leave at exit 0 come out exactly as the first exit computed them; and under a
    policy that splits ``x`` over every exit, stage k runs on exactly the rows that did not leave before it."""
    import copy
    import math

    def check(net, x):
        with torch.no_grad():
            first = net(x)[0]
        poisoned = copy.deepcopy(net)
        with torch.no_grad():
            for mod in list(poisoned.stages[1:]) + list(poisoned.heads[1:]):
                for p in mod.parameters():
                    p.fill_(float("nan"))
        r = poisoned.infer(x, [-math.inf] * (net.num_exits - 1))          # everyone leaves at exit 0
        assert r.exit_index.tolist() == [0] * len(x)
        torch.testing.assert_close(r.logits, first)
        _, r, seen = stage_rows(net, x)
        assert sorted(set(r.exit_index.tolist())) == list(range(net.num_exits))
        assert seen == {k: [int((r.exit_index >= k).sum())] for k in seen}
    return check
