import pytest
import torch


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
