"""DynConv: sparse block execution, the gated-model contract, cost accounting, export refusal, bad inputs."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.dynamic.spatial import (SparseExportError, gated_branch, masked_block_forward, neighbour_fill,
                                    sparse_block_forward)
from dyncnn.models import create_model
from dyncnn.models.dynconv import DynConvCfg, DynConvNet, tiny_resnet_mnist
from dyncnn.models.mobilenet import InvertedResidual, InvertedResidualCfg
from dyncnn.models.resnet import BasicBlock, Bottleneck

DENSITIES = (0.0, 0.1, 0.25, 0.5, 1.0)


def _randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _blocks():
    return {"basic": BasicBlock(6, 6), "bottleneck": Bottleneck(8, 2),
            "inverted": InvertedResidual(InvertedResidualCfg(6, 12, 6, act="relu6")),
            "inverted_noexpand": InvertedResidual(InvertedResidualCfg(6, 6, 6, act="relu6"))}


def _mask(n, h, w, density, seed):
    if density >= 1:
        return torch.ones(n, h, w, dtype=torch.bool)
    return torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)) < density


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "inverted", "inverted_noexpand"])
def test_sparse_block_equals_dense_block_at_active_positions(kind, density):
    block = _randomise_bn(_blocks()[kind])
    g = gated_branch(block)
    assert g is not None
    x = torch.randn(2, block.in_chs if hasattr(block, "in_chs") else 6, 7, 6).relu()
    mask = _mask(2, 7, 6, density, seed=int(100 * density))
    with torch.no_grad():
        dense = block(x)
        sparse, macs = sparse_block_forward(g, x, mask)
    on = mask.unsqueeze(1).expand_as(dense)
    assert torch.allclose(sparse[on], dense[on], atol=1e-5)
    skipped = g.finish(x.clone())                       # skipped positions keep the residual
    assert torch.equal(sparse[~on], skipped[~on])
    # cost: the units up to the split on the dilated mask, the rest on the mask
    from dyncnn.layers.sparse_conv import dilate_mask
    d = dilate_mask(mask, g.dilation) if g.split > 0 else mask
    want = sum(u.conv.weight.numel() * (d if i < g.split else mask).flatten(1).sum(1)
               for i, u in enumerate(g.units))
    assert torch.equal(macs, want)


def test_interpolation_fills_skipped_positions_from_computed_neighbours():
    block = _randomise_bn(BasicBlock(4, 4))
    g = gated_branch(block)
    x = torch.randn(2, 4, 6, 6).relu()
    mask = _mask(2, 6, 6, 0.3, seed=1)
    with torch.no_grad():
        sparse, _ = sparse_block_forward(g, x, mask, interpolate=True)
        # the training formula with the same hard mask is the dense reference
        ref, _ = masked_block_forward(g, x, mask.unsqueeze(1).float(), interpolate=True)
        r = g.branch(x) * mask.unsqueeze(1)
        fill = neighbour_fill(r, mask.unsqueeze(1).float())
    assert torch.allclose(sparse, ref, atol=1e-5)
    near = ~mask & (nn.functional.max_pool2d(mask.float().unsqueeze(1), 3, 1, 1)[:, 0] > 0)
    assert bool(near.any())
    assert bool((fill.abs().sum(1)[near] > 0).all())                # filled, not just the residual
    assert not torch.allclose(sparse, sparse_block_forward(g, x, mask)[0])


def test_stride_and_se_blocks_run_dense():
    assert gated_branch(BasicBlock(4, 8, stride=2)) is None
    assert gated_branch(InvertedResidual(InvertedResidualCfg(8, 16, 8, se=True))) is None


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    out = {}
    for name in ("dynconv_tiny_resnet_mnist", "dynconv_tiny_mobilenet_v2_mnist"):
        m = _randomise_bn(create_model(name, init_bias=0.0))
        for unit in m.mask_units:       # masks of mixed density
            nn.init.normal_(unit.conv.weight, std=0.5)
        out[name] = m
    return out


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))


NAMES = ["dynconv_tiny_resnet_mnist", "dynconv_tiny_mobilenet_v2_mnist"]


@pytest.mark.parametrize("name", NAMES)
def test_ledger_equals_flop_counter_and_batched_equals_per_sample(tiny_models, images, name):
    model = tiny_models[name]
    model.infer(images)                                # warm the executor's cost cache
    with FlopCounterMode(display=False) as counter:
        r = model.infer(images)
    assert int(r.macs.sum()) == counter.get_total_flops() // 2
    frac = r.fractions
    assert frac.shape == (3, len(model.decision_names)) and bool(((frac > 0) & (frac < 1)).any())
    assert bool((r.macs < model.full_macs(images)).all())
    assert len(set(r.macs.tolist())) > 1               # data-dependent cost per sample
    for i in range(3):
        ri = model.infer(images[i:i + 1])
        assert torch.allclose(ri.logits, r.logits[i:i + 1], atol=1e-5)
        assert int(ri.macs[0]) == int(r.macs[i])
        assert torch.equal(ri.choices[0], r.choices[i])
    assert torch.equal(model(images), r.logits)        # eval forward = infer().logits


@pytest.mark.parametrize("name", NAMES)
def test_forced_on_reproduces_static_backbone(tiny_models, images, name):
    model = tiny_models[name]
    model.force(True)
    try:
        r = model.infer(images)
        with FlopCounterMode(display=False) as counter:
            static = model.backbone(images)
    finally:
        model.force(None)
    assert torch.equal(r.logits, static)
    assert int(r.macs[0]) == counter.get_total_flops() // 2 // 3
    assert bool((r.choices == 1).all())


@pytest.mark.parametrize("name", NAMES)
def test_full_macs_does_not_depend_on_the_forced_state(tiny_models, images, name):
    """Regression: after ``force(False)`` full_macs returned the all-off cost. It is the static backbone plus
    every mask unit on its block's input, counted by FlopCounterMode, in every forced state."""
    model = tiny_models[name]
    gated = [b for b, g in zip(model._blocks, model._gated) if g is not None]
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in gated]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.backbone(images[:1])
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as units:
        for unit, h in zip(model.mask_units, inputs):
            unit(h)
    want = (counter.get_total_flops() + units.get_total_flops()) // 2
    for value in (None, True, False, None):
        model.force(value)
        try:
            assert model.full_macs(images) == want, value
        finally:
            model.force(None)


def test_all_off_skips_every_gated_block(tiny_models, images):
    model = tiny_models["dynconv_tiny_resnet_mnist"]
    model.force(False)
    try:
        r = model.infer(images)
    finally:
        model.force(None)
    assert bool((r.choices == 0).all()) and bool((r.exit_index == 0).all())
    assert bool((r.macs < model.full_macs(images) // 2).all())


def test_training_forward_gradients_and_budget(images):
    torch.manual_seed(1)
    model = create_model("dynconv_tiny_resnet_mnist", budget=0.25, anneal_noise=False).train()
    model.set_progress(0.0)
    out = model(images)
    loss = out.logsumexp(1).mean() + model.regularization_loss()
    loss.backward()
    for unit in model.mask_units:
        assert unit.conv.weight.grad is not None and unit.conv.weight.grad.abs().sum() > 0
    # masks start mostly on (init bias 1): far above a 0.25 budget, so the cost term is positive
    assert model.regularization_loss().item() > 0
    # bounds tighten as training progresses: same decisions, larger penalty at progress 1
    torch.manual_seed(2)
    model(images)
    early = model.regularization_loss().item()
    model.set_progress(1.0)
    torch.manual_seed(2)
    model(images)
    assert model.regularization_loss().item() > early


def test_masks_fractions_and_choices_of_infer(tiny_models, images):
    model = tiny_models["dynconv_tiny_resnet_mnist"]
    r = model.infer(images)
    masks = r.masks
    assert len(masks) == len(model.decision_names)
    for k, m in enumerate(masks):
        assert m.dtype == torch.bool and m.shape[0] == 3
        assert torch.allclose(m.flatten(1).float().mean(1), r.fractions[:, k])
    # choices keep the one meaning of every family: 0/1 per decision (here: did the block compute any position)
    assert torch.equal(r.choices, (r.fractions > 0).to(torch.int64)) and set(r.choices.unique().tolist()) <= {0, 1}
    assert torch.equal(r.exit_index, r.choices.sum(1))
    assert all(torch.equal(a, b) for a, b in zip(model.masks(images), masks))


def test_export_refuses_the_sparse_path(tiny_models, images, tmp_path):
    from dyncnn.export.onnx import export_onnx
    model = tiny_models["dynconv_tiny_resnet_mnist"]
    with pytest.raises(ValueError, match="data-dependent"):
        export_onnx(model, images[:1], tmp_path / "dynconv.onnx", check=False)
    assert not (tmp_path / "dynconv.onnx").exists()
    with pytest.raises(SparseExportError):
        torch.jit.trace(model, images[:1], check_trace=False)


def test_bad_inputs(images):
    for budget in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            create_model("dynconv_tiny_resnet_mnist", budget=budget)
    with pytest.raises(ValueError, match="mask_kernel"):
        DynConvCfg(mask_kernel=5)
    model = create_model("dynconv_tiny_resnet_mnist").eval()
    with pytest.raises(ValueError, match="input channels"):
        model.infer(torch.rand(2, 3, 32, 32))
    g = gated_branch(BasicBlock(4, 4).eval())
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        sparse_block_forward(g, torch.rand(2, 4, 5, 5), torch.ones(2, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="ResNet and MobileNet"):
        DynConvNet(create_model("tiny_mobilenet"))


def test_published_figure_and_mask_kernel():
    from dyncnn.models import published_figures
    pub = published_figures("dynconv_resnet32_cifar")
    assert pub["macs"] == 55.4e6 and pub["budget"] == 0.7
    model = create_model("dynconv_resnet32_cifar")
    assert len(model.decision_names) == 13 and model.cfg.budget == 0.7
    m3 = DynConvNet(tiny_resnet_mnist(), DynConvCfg(mask_kernel=3))
    assert m3.mask_units[0].conv.kernel_size == (3, 3)


def test_mask_overlay_plot(tiny_models, images, tmp_path):
    from dyncnn.viz.spatial_plots import plot_mask_overlays, plot_model_masks
    model = tiny_models["dynconv_tiny_resnet_mnist"]
    path = plot_model_masks(model, images, tmp_path / "masks.png", max_samples=2)
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"\(N, h, w\) with N = 3"):
        plot_mask_overlays(images, [torch.ones(2, 4, 4, dtype=torch.bool)], tmp_path / "bad.png")


def test_noise_annealing_makes_training_decisions_the_test_decisions(images):
    model = _randomise_bn(create_model("dynconv_tiny_resnet_mnist", init_bias=0.0))
    for unit in model.mask_units:
        nn.init.normal_(unit.conv.weight, std=0.5)
    want = model.masks(images)
    model.set_progress(1.0)                  # noise scale 1 - progress = 0: the hard decision is logits >= 0
    with torch.no_grad():
        h = model.backbone.stem(images)
        got, k = [], 0
        for block, g in zip(model._blocks, model._gated):
            if g is None:
                h = block(h)
                continue
            m = model._mask(model.mask_units[k], h)
            got.append(m[:, 0] > 0.5)
            h = masked_block_forward(g, h, m, False)[0]
            k += 1
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    model.set_progress(0.0)                  # full noise: some decisions differ
    with torch.no_grad():
        h = model.backbone.stem(images)
        noisy = model._mask(model.mask_units[0], h)[:, 0] > 0.5
    assert not torch.equal(noisy, want[0])


def test_evaluation_reports_active_positions_apart_from_decision_rates(tiny_models, images):
    from dyncnn.dynamic.evaluation import evaluate_dynamic, format_dynamic
    model = tiny_models["dynconv_tiny_resnet_mnist"]
    r = evaluate_dynamic(model, list(zip(images, torch.zeros(len(images), dtype=torch.int64))), batch_size=2)
    fractions = model.infer(images).fractions
    assert r["active_fraction"] == pytest.approx(fractions.double().mean(0).tolist(), abs=1e-4)
    # the decision rates are those of the 0/1 choices (did a block compute any position), not the shares
    assert r["choice_rate"] == pytest.approx((fractions > 0).double().mean(0).tolist(), abs=1e-4)
    text = format_dynamic(r)
    assert "active positions: " in text and "decision rates: " in text


def test_sparse_path_runs_the_folded_convolutions_after_optimize_for_inference(tiny_models, images):
    """The sparse units read their modules from the block, so BatchNorm folded into the convolution is what the
    gather-GEMM-scatter path packs: no stale copy of the old conv and BN is kept aside."""
    from dyncnn.layers.fusion import optimize_for_inference
    model = tiny_models["dynconv_tiny_resnet_mnist"]
    want = model.infer(images)
    fast = optimize_for_inference(model)
    tree = {id(m) for m in fast.modules()}
    units = [u for g in fast._gated if g is not None for u in g.units]
    assert units and all(id(u.conv) in tree and isinstance(u.norm, nn.Identity) for u in units)
    got = fast.infer(images)
    assert torch.equal(got.macs, want.macs) and torch.equal(got.fractions, want.fractions)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
