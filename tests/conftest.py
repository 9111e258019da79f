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
