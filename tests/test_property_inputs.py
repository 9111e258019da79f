"""Property: whatever array comes in (any shape, dtype, values, or not an array at all), eager ``infer`` and a
bundle's ``run`` give a correct result or a DyncnnError, never another exception. Tiny models, few examples."""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import dyncnn
from dyncnn.errors import DyncnnError
from dyncnn.export import export_bundle, load_bundle

SETTINGS = settings()      # the profile that tests/conftest.py loads: DYNCNN_HYPOTHESIS_PROFILE=ci (default) or long
RUNS: dict[str, int] = {}  # examples run per test (the inner properties escape --hypothesis-show-statistics)


def _report(key: str) -> None:
    print(f"\n{key}: {RUNS.get(key, 0)} examples ({settings().max_examples} asked)")   # shown with pytest -s
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


def _families():
    torch.manual_seed(0)
    return {
        "msdnet": (dyncnn.create_model("msdnet_cifar", num_classes=5, in_chans=1, nBlocks=2, step=1, base=1,
                                       nChannels=4, growthRate=2).eval(), (1, 32, 32)),
        "multi_exit": (dyncnn.create_model("multi_exit", backbone="tiny_mobilenet", num_classes=5, in_chans=1,
                                           backbone_cfg={"widths": [4, 8]}).eval(), (1, 32, 32)),
        "skipnet": (dyncnn.create_model("skipnet_resnet20_cifar", num_classes=5, in_chans=1,
                                        width_mult=0.25).eval(), (1, 32, 32)),
    }


FAMILIES = _families()


@st.composite
def inputs(draw, shape):
    """Half the time a well-formed batch of ``shape`` (any dtype and values), else any shape."""
    if draw(st.booleans()):
        dims = (draw(st.integers(0, 3)), *shape)
    else:
        dims = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=5)))
    if int(np.prod(dims, dtype=np.int64)) > 20000:
        dims = dims[:1] + tuple(min(d, 8) for d in dims[1:])
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from(["rand", "randn", "big", "nan", "inf", "zeros"]))
    x = {"rand": torch.rand, "randn": torch.randn, "zeros": torch.zeros}.get(fill, torch.rand)(dims) \
        if dtype.is_floating_point or fill in ("rand", "zeros") else torch.zeros(dims)
    if fill == "big":
        x = x * 1e30
    if fill in ("nan", "inf") and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = float(fill)
    x = x.to(dtype) if dtype != torch.bool else x > 0.5
    kind = draw(st.sampled_from(["tensor", "tensor", "tensor", "numpy", "list", "scalar", "none"]))
    if kind == "numpy":
        return x.float().numpy().astype(draw(st.sampled_from([np.float32, np.float64, np.float16, np.int32])))
    return {"tensor": x, "list": x.tolist(), "scalar": 0.5, "none": None}[kind]


POLICIES = st.one_of(st.none(), st.lists(st.floats(0, 1), min_size=0, max_size=3), st.floats(0, 1),
                     st.just("0.5"))


def _assert_close_at_scale(got, want):
    """float32 closeness judged against each row's largest logit: at inputs near 1e30 a logit is a difference of
    huge terms, so an elementwise relative tolerance fails on rounding that is 1e-7 of the row's scale."""
    scale = want.abs().amax(dim=-1, keepdim=True).clamp_min(1.0) if want.numel() else 1.0
    torch.testing.assert_close(got / scale, want / scale, rtol=1e-4, atol=1e-5)


def _check_eager(model, x, policy, result):
    """The result is what the model's full forward pass gives at the exit each sample took."""
    n = x.shape[0]
    assert result.logits.shape == (n, model.num_classes) and result.exit_index.shape == result.macs.shape == (n,)
    assert bool((result.macs > 0).all()) or n == 0
    if n and hasattr(model, "heads"):
        with torch.no_grad():
            every = torch.stack(model(x))                               # (exits, N, classes)
        want = every[result.exit_index, torch.arange(n)]
        _assert_close_at_scale(result.logits, want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eager_infer_gives_a_result_or_a_dyncnn_error(family):
    model, shape = FAMILIES[family]
    takes_policy = hasattr(model, "heads") or family == "gfnet"

    @SETTINGS
    @given(x=inputs(shape), policy=POLICIES)
    @example(x=torch.rand(2, 1, 0, 32), policy=None)           # edge cases, always tried
    @example(x=torch.rand(2, 1, 1, 1), policy=[0.5])
    @example(x=torch.rand(1, 1, 2, 3), policy=None)
    @example(x=torch.rand(1, 1, 200, 9), policy=[])
    def prop(x, policy):
        RUNS[family] = RUNS.get(family, 0) + 1
        try:
            result = model.infer(x, policy) if takes_policy else model.infer(x)
        except DyncnnError:
            return
        _check_eager(model, x, policy, result)
    prop()
    _report(family)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("prop")
    static = dyncnn.create_model("tiny_mobilenet", num_classes=5, in_chans=1, widths=[4]).eval()
    export_bundle(static, root / "static", (1, 32, 32))
    multi, _ = FAMILIES["multi_exit"]
    export_bundle(multi, root / "multi", (1, 32, 32), policy=[0.3])
    return {"static": (static, load_bundle(root / "static")), "multi": (multi, load_bundle(root / "multi"))}


@pytest.mark.parametrize("kind", ["static", "multi"])
def test_bundle_run_gives_a_result_or_a_dyncnn_error(bundles, kind):
    model, bundle = bundles[kind]

    @SETTINGS
    @given(x=inputs((1, 32, 32)), policy=POLICIES)
    def prop(x, policy):
        RUNS[f"bundle {kind}"] = RUNS.get(f"bundle {kind}", 0) + 1
        try:
            got = bundle.run(x, policy) if kind == "multi" else bundle.run(x)
        except DyncnnError:
            return
        x32 = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not isinstance(x, torch.Tensor) else x.float()
        if kind == "static" and x32.shape[0] == 0:
            assert got.shape == (0, model.num_classes)
        elif kind == "static":
            with torch.no_grad():
                _assert_close_at_scale(got, model(x32))
        else:
            _check_eager(model, x32, policy, got)
    prop()
    _report(f"bundle {kind}")
