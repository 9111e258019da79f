"""One contract for every registered dynamic model (every builder whose model has ``infer``), at a small size.

A family passes by being registered: nothing here names a family's internals, only what the contract promises.
- ``infer(x)`` returns an ``ExitResult`` (logits (N, classes), exit_index (N,), macs (N,) int64, choices None or N rows);
- batched ``infer`` == one sample at a time (logits, exit index, MACs and choices);
- the MACs ledger == FlopCounterMode of the same call, and no sample costs more than ``full_macs``;
- decisions differ across samples, so the checks above are not trivially about one path: the untrained model's
  BatchNorm statistics are measured on the batch, then exit classifiers and thresholds (models that take a policy)
  or gate / policy / router / mask-unit layers (gated models) are set so that samples split with wide margins;
- checkpoint save -> load (rebuilt from the header) -> identical outputs;
- a training-mode model is not changed by ``infer`` (its result is the eval-mode one);
- ``optimize_for_inference`` (BatchNorm folded, channels-last weights) keeps decisions, MACs and the ledger;
- and, per family, export either matches eager or raises ``ExportError`` saying why.
"""
from __future__ import annotations

import inspect
import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dyncnn.dynamic.executor import ExitResult
from dyncnn.dynamic.policy import ExitPolicy
from dyncnn.layers.fusion import optimize_for_inference
from dyncnn.models.registry import create_model, list_models, model_class

# Registered sizes that are too large for a 2-core test: the same family, built small.
SMALL = {
    "adafocus_mobilenet_v2": {"frames": 4, "patch_size": 32, "glance_size": 32},
    "adafocus_tiny": {"frames": 4},
    "channel_gated_mobilenet_v2": {"width_mult": 0.25},
    "channel_gated_resnet110_cifar": {"width_mult": 0.25},
    "blockdrop_resnet110_cifar": {"width_mult": 0.25},
    "skipnet_mobilenet_v2": {"width_mult": 0.25},
    "skipnet_resnet110_cifar": {"width_mult": 0.25},
    "skipnet_resnet56_cifar": {"width_mult": 0.25},
    **{f"gfnet_{b}": {"input_size": 64, "glance_size": 32, "patch_size": 32, "num_steps": 3}
       for b in ("densenet121", "mobilenet_v3_large", "resnet50")},
    "msdnet_cifar": {"nBlocks": 3, "step": 1, "base": 1, "nChannels": 8, "growthRate": 4},
    "msdnet_imagenet": {"nBlocks": 3, "step": 1, "base": 1, "nChannels": 8, "growthRate": 4},
    "msdnet_imagenet_step7": {"nBlocks": 3, "step": 1, "base": 1, "nChannels": 8, "growthRate": 4},
}
# Input shapes (without the batch) where the model's own default is large.
SHAPES = {"adafocus_mobilenet_v2": (4, 3, 64, 64), "adafocus_tiny": (4, 1, 64, 64), "gfnet_densenet121": (3, 64, 64),
          "gfnet_mobilenet_v3_large": (3, 64, 64), "gfnet_resnet50": (3, 64, 64), "msdnet_imagenet": (3, 64, 64),
          "msdnet_imagenet_step7": (3, 64, 64), "ranet_imagenet": (3, 64, 64)}
N = 6


def _dynamic_names() -> list[str]:
    return [n for n in list_models() if hasattr(model_class(n) or object, "infer")]


DYNAMIC = _dynamic_names()
# The IMTA recipe (forward knowledge transfer changes what each stage passes on) on every multi-exit family:
# "NAME+imta" builds NAME with imta=True (and its SMALL size, or the variant's own). Their bundles must export:
# an ExportError is a failure for them.
IMTA_VARIANTS = ["msdnet_cifar+imta", "ranet_cifar+imta", "multi_exit+imta", "multi_stage+imta"]
SMALL["multi_exit+imta"] = {"backbone": "tiny_mobilenet", "backbone_cfg": {"widths": [8, 16, 32, 64]},
                            "example_size": 32}


def test_every_builder_declares_the_class_it_builds():
    """The contract finds dynamic models through the builders' return annotations: a builder without one would
    escape it silently."""
    missing = [n for n in list_models() if model_class(n) is None]
    assert not missing, f"builders without a return annotation naming their model class: {missing}"
    assert len(DYNAMIC) >= 40 and "msdnet_cifar" in DYNAMIC and "skipnet_resnet20_cifar" in DYNAMIC


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    base, _, recipe = name.partition("+")
    extra = {"imta": True} if recipe == "imta" else {}
    return create_model(base, num_classes=10, **SMALL.get(name, SMALL.get(base, {})), **extra).eval()


def _input(name: str, model: nn.Module, n: int = N) -> torch.Tensor:
    shape = SHAPES.get(name.partition("+")[0]) or getattr(model, "default_input_shape", None)
    if shape is None:
        side = max(32, getattr(model, "min_input_size", 1) or 1)
        shape = (getattr(model, "in_chans", 3), side, side)
    g = torch.Generator().manual_seed(1)
    scale = torch.linspace(0.3, 2.0, n).view(n, *[1] * len(shape))     # samples that differ in contrast and level,
    shift = torch.linspace(-1.0, 1.0, n).flip(0).view_as(scale)        # so that decisions on pooled features differ
    return torch.randn(n, *shape, generator=g) * scale + shift


def _takes_policy(model: nn.Module) -> bool:
    return "policy" in inspect.signature(model.infer).parameters


def _distinct(result: ExitResult) -> int:
    rows = result.exit_index.view(len(result), -1).float()
    if result.choices is not None:
        rows = torch.cat([rows, result.choices.reshape(len(result), -1).float()], 1)
    if result.fractions is not None:
        rows = torch.cat([rows, result.fractions.reshape(len(result), -1).float()], 1)
    return len({tuple(r.tolist()) for r in rows})


def _randomise(model: nn.Module, x: torch.Tensor, infer) -> None:
    """BatchNorm statistics measured on ``x`` (each BatchNorm takes the mean and variance of its first input of
    more than one value per channel), then random affine parameters: activations stay at unit scale through the
    untrained network, so that its outputs depend on the input (with the initial statistics, small untrained
    activations are swamped and every input gives nearly the same answer)."""
    done: set[int] = set()

    def measure(m, args):
        h = args[0]
        dims = [d for d in range(h.dim()) if d != 1]
        if id(m) in done or h.numel() // h.shape[1] < 2:
            return
        done.add(id(m))
        with torch.no_grad():
            m.running_mean.copy_(h.mean(dims))
            var = h.var(dims)
            m.running_var.copy_(var.clamp_min(0.1 * float(var.mean()) + 1e-5))   # no near-constant channel blown up
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    hooks = [m.register_forward_pre_hook(measure) for m in bns]
    try:
        infer(x)
    finally:
        for h in hooks:
            h.remove()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in bns:
            if m.affine:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)


DECISION = re.compile(r"(^|\.)(gates?|policy|router|mask_units)(\.\d+)?(\.(fc|conv))?$")


def _decision_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose outputs are a gated model's decision logits (gate / policy / router / mask unit)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None and DECISION.search(n)]


def _widest_middle_gap(srt: torch.Tensor) -> torch.Tensor:
    """Per column of sorted values, the midpoint of the widest gap in the middle half."""
    n = len(srt)
    lo, hi = n // 4, max(n // 4 + 1, (3 * n) // 4)
    k = lo + (srt[lo + 1:hi + 1] - srt[lo:hi]).argmax(0)
    cols = torch.arange(srt.shape[1])
    return (srt[k, cols] + srt[(k + 1).clamp(max=n - 1), cols]) / 2


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().movedim(1, -1).reshape(-1, t.shape[1])       # (rows [x positions], channels)


def _spread_layers(layers: list[nn.Module], x: torch.Tensor, infer) -> None:
    """Decision logits that differ by several units between samples (weights scaled by the spread of the layer's
    input), each output centred at the widest gap between the values it takes on ``x``: decisions (thresholds
    and argmaxes alike) mix across samples with margins far above rounding. Layer by layer, in order, because
    earlier decisions change what later gates see."""
    g = torch.Generator().manual_seed(3)
    for layer in layers:
        seen = []
        hook = layer.register_forward_hook(lambda m, i, o: seen.append((_rows(i[0]), _rows(o))))
        try:
            infer(x)
            if not seen:                                # a gate this model never consults (forced decisions)
                continue
            inputs = torch.cat([i for i, _ in seen])
            spread = inputs.std(0) if len(inputs) > 1 else torch.ones(inputs.shape[1])
            spread = spread.clamp_min(0.1 * float(spread.mean()) + 1e-6)        # amplify no input feature > 10x
            with torch.no_grad():
                w = torch.randn(layer.weight.shape, generator=g) * 3.0 / layer.weight[0].numel() ** 0.5
                layer.weight.copy_(w / spread.view(1, -1, *[1] * (w.dim() - 2)))
                layer.bias.zero_()
            seen.clear()
            infer(x)
        finally:
            hook.remove()
        out = torch.cat([o for _, o in seen]) if seen else torch.zeros(0)
        if len(out) >= 2:
            with torch.no_grad():
                layer.bias -= _widest_middle_gap(out.sort(0).values)


def _spread_policy(model: nn.Module, x: torch.Tensor) -> ExitPolicy:
    """Max-probability thresholds, each at the widest gap between the confidences of the samples still present
    (no sample sits near a threshold, where the rounding of a batched and a single run could differ), keeping
    some samples for the later exits. Every model that takes a policy returns its exits' logits from forward."""
    with torch.no_grad():
        outs = model(x)
    k, left, thresholds = len(outs), torch.ones(len(x), dtype=torch.bool), []
    # per exit, the temperature under which these samples' confidences differ most (untrained exits can answer
    # almost the same for every input at temperature 1)
    grid = torch.logspace(-2, 1, 16, dtype=torch.float64)
    temps = [float(grid[torch.stack([torch.softmax(o.double() / t, 1).max(1).values.std() for t in grid]).argmax()])
             for o in outs]
    for j, logits in enumerate(outs[:-1]):
        conf = torch.softmax(logits.double() / temps[j], 1).max(1).values
        c = conf[left].sort().values
        gaps = c[1:] - c[:-1] if len(c) > 1 else c[:0]
        if len(gaps) == 0 or float(gaps.max()) < 1e-3:
            thresholds.append(2.0)                     # no clear split among the samples left: no one leaves here
            continue
        i = int(gaps[: max(1, len(gaps) - 1)].argmax()) if k - j > 2 else int(gaps.argmax())
        t = float(c[i] + c[i + 1]) / 2
        thresholds.append(t)
        left &= conf < t
    return ExitPolicy(thresholds, "max_prob", temps)


def _prepare(name: str):
    model = _build(name)
    x = _input(name, model)
    _randomise(model, x, model.infer)
    if _takes_policy(model):
        # spread the exits' classifiers first, so that confidences differ between samples
        _spread_layers([m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 10
                        and m.bias is not None], x, model.infer)
        policy = _spread_policy(model, x)
        return model, x, (lambda inp: model.infer(inp, policy)), policy
    _spread_layers([m for _, m in _decision_layers(model)], x, model.infer)
    return model, x, model.infer, None


@pytest.mark.parametrize("name", DYNAMIC + IMTA_VARIANTS)
def test_dynamic_contract(name, tmp_path):
    model, x, infer, policy = _prepare(name)
    with FlopCounterMode(display=False) as counter:
        r = infer(x)
    # what infer returns
    assert isinstance(r, ExitResult), type(r)
    assert r.logits.shape == (N, 10) and r.exit_index.shape == (N,) and r.macs.shape == (N,)
    assert r.macs.dtype == torch.int64 and bool((r.macs > 0).all())
    assert r.choices is None or r.choices.shape[0] == N
    if r.choices is not None:     # one meaning everywhere: 0/1 per named decision (routing: one-hot per cell)
        assert set(r.choices.unique().tolist()) <= {0, 1}, f"choices must be 0/1, got {r.choices.unique().tolist()}"
        names = getattr(model, "decision_names", None)
        if names is not None and r.choices.dim() == 2:
            assert r.choices.shape[1] == len(names), (r.choices.shape, len(names))
    assert bool(torch.isfinite(r.logits).all())
    # the ledger is what ran, and nothing costs more than the whole network
    assert int(r.macs.sum()) == counter.get_total_flops() // 2, "ledger != FlopCounterMode of the same call"
    full = int(model.full_macs(x[:1]))
    assert bool((r.macs <= full).all()), (r.macs.tolist(), full)
    # the decisions are really mixed in this batch
    if not getattr(model, "force_update", False):      # Skip-RNN's plain baselines update at every step by design
        assert _distinct(r) > 1, "every sample took the same path: the contract checks would be trivial"
    # batched == one sample at a time
    # (decisions and MACs exactly; logits to float32 rounding of deep untrained networks, whose batch-1 and
    # batch-N kernels differ: up to 0.3% of the logits' scale on an AVX2 AMD EPYC, 0.38% for the untrained
    # gfnet_mobilenet_v3_large on an Intel Xeon, whose float64 copy agrees batched and one at a time to 5e-13)
    atol = 5e-3 * float(r.logits.abs().max())
    for i in range(N):
        one = infer(x[i:i + 1])
        assert int(one.exit_index) == int(r.exit_index[i]) and int(one.macs) == int(r.macs[i]), i
        if r.choices is not None:
            torch.testing.assert_close(one.choices, r.choices[i:i + 1], rtol=0, atol=0)
        if r.fractions is not None:
            torch.testing.assert_close(one.fractions, r.fractions[i:i + 1], rtol=0, atol=0)
        torch.testing.assert_close(one.logits, r.logits[i:i + 1], rtol=1e-3, atol=atol)
    # checkpoint save -> load (rebuilt from the header alone) -> the same outputs
    from dyncnn.train.checkpoint import load_checkpoint, save_checkpoint
    save_checkpoint(tmp_path / "m.safetensors", model)
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    loaded.eval()
    again = loaded.infer(x, policy) if policy is not None else loaded.infer(x)
    assert torch.equal(again.logits, r.logits) and torch.equal(again.exit_index, r.exit_index)
    assert torch.equal(again.macs, r.macs)
    # infer on a model in training mode: the eval-mode result, and the model (BatchNorm statistics) unchanged
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    trained = infer(x)
    model.eval()
    assert torch.equal(trained.exit_index, r.exit_index)
    torch.testing.assert_close(trained.logits, r.logits, rtol=1e-3, atol=atol)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"infer in training mode changed {k}"
    # BatchNorm folded and channels-last weights: the same decisions and MACs, and the ledger is still what ran
    fast = optimize_for_inference(model)
    fast_infer = (lambda inp: fast.infer(inp, policy)) if policy is not None else fast.infer
    with FlopCounterMode(display=False) as counter:
        f = fast_infer(x)
    assert torch.equal(f.exit_index, r.exit_index) and torch.equal(f.macs, r.macs)
    assert int(f.macs.sum()) == counter.get_total_flops() // 2
    if r.choices is not None:
        assert torch.equal(f.choices, r.choices)
    torch.testing.assert_close(f.logits, r.logits, rtol=1e-3, atol=atol)


def _one_per_family() -> list[str]:
    seen, names = set(), []
    for name in DYNAMIC:
        cls = model_class(name)
        if cls not in seen:
            seen.add(cls)
            names.append(name)
    return names


@pytest.mark.parametrize("name", _one_per_family() + IMTA_VARIANTS)
def test_export_matches_eager_or_says_why(name, tmp_path):
    from dyncnn.export import ExportError, export_bundle, load_bundle
    model, x, infer, policy = _prepare(name)
    try:
        export_bundle(model, tmp_path / "b", tuple(x.shape[1:]), policy=policy)
    except ExportError as e:
        assert name not in IMTA_VARIANTS, f"forward knowledge transfer must export: {e}"
        assert len(str(e)) > 20, str(e)                # a reason, not a bare failure
        return
    bundle = load_bundle(tmp_path / "b")
    got, want = bundle.run(x.numpy()), infer(x)
    logits = torch.as_tensor(got.logits if hasattr(got, "logits") else got)
    torch.testing.assert_close(logits, want.logits, rtol=1e-3, atol=3e-3 * float(want.logits.abs().max()))
    if hasattr(got, "exit_index"):
        assert torch.equal(torch.as_tensor(got.exit_index), want.exit_index)
        assert torch.equal(torch.as_tensor(got.macs), want.macs)
