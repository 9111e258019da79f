"""Cut a backbone into consecutive segments at chosen modules, so that a multi-exit network can stop after any
of them. Works for any model torch.fx can trace (dyncnn's, torchvision's, most of timm's).

The traced graph of ``forward_features`` (or ``forward``) is partitioned in node order: segment k holds the nodes
after boundary k-1 up to and including the output node of boundary module k. Each segment becomes its own
GraphModule whose inputs are the values it needs from earlier segments and whose outputs are the values later
segments (or its exit head) need, so networks with long-range connections (dense blocks, multi-scale features)
split as well as chains. Running the segments in order equals running the model.
"""
from __future__ import annotations

import inspect

import torch.fx as fx
from torch import Tensor, nn

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class Segment(nn.Module):
    """One segment: reads named values from the state dict, returns the state dict for what comes after."""

    def __init__(self, gm: fx.GraphModule, inputs: list[str], outputs: list[str], keep: list[str], boundary: str):
        super().__init__()
        self.gm, self.inputs, self.outputs, self.keep, self.boundary = gm, inputs, outputs, keep, boundary

    def forward(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        values = self.gm(*[state[name] for name in self.inputs])
        new = {name: state[name] for name in self.keep}
        new.update(zip(self.outputs, values))
        return new


class _Call(nn.Module):
    """Traces ``model.<method>(x)`` with every other argument at its default (one input to split)."""

    def __init__(self, m: nn.Module, method: str):
        super().__init__()
        self.m, self.method = m, method

    def forward(self, x):
        return getattr(self.m, self.method)(x)


def _trace(model: nn.Module, method: str) -> tuple[fx.GraphModule, str]:
    """(graph, prefix of module paths in it). A plain ``forward(x)`` is traced directly (module paths as in the
    model); other methods, and a forward with optional arguments (timm's ViT: ``attn_mask``, ``is_causal``),
    through a one-input wrapper."""
    if method == "forward" and len(inspect.signature(model.forward).parameters) == 1:
        return fx.symbolic_trace(model), ""
    return fx.symbolic_trace(_Call(model, method)), "m."


def _param_owners(nodes: list[fx.Node], prefix: str, model: nn.Module) -> list[str]:
    """Paths (in ``model``) of the modules whose parameters ``nodes`` use, in order."""
    owners = []
    for n in nodes:
        if n.op == "call_module":
            path = str(n.target)
        elif n.op == "get_attr":
            path = str(n.target).rpartition(".")[0]
        else:
            continue
        path = path[len(prefix):]
        if next(model.get_submodule(path).parameters(), None) is not None and path not in owners:
            owners.append(path)
    return owners


def _feature_modules(model: nn.Module) -> set[str] | None:
    """Paths of the parametrized modules ``forward_features`` runs (timm and dyncnn backbones), else None."""
    if not callable(getattr(model, "forward_features", None)) or not callable(getattr(model, "forward_head", None)):
        return None
    try:
        gm, prefix = _trace(model, "forward_features")
    except Exception:  # noqa: BLE001 - torch.fx raises many kinds of errors; fall back to the simpler rule
        return None
    return set(_param_owners(list(gm.graph.nodes), prefix, model))


def is_head(model: nn.Module, owners: list[str]) -> bool:
    """Whether the modules ``owners`` (run after the last cut) are only the model's head: normalization layers
    and what ``forward_head`` runs (timm, dyncnn), or else the top-level child that holds the last layer (the
    ``fc`` / ``classifier`` of torchvision models). Then the exit after that cut is the model's own output."""
    if not owners:
        return True
    features = _feature_modules(model)

    def head(path: str) -> bool:
        if isinstance(model.get_submodule(path), NORMS):
            return True
        if features is not None:
            return path not in features
        return path.split(".")[0] == owners[-1].split(".")[0]
    return all(head(p) for p in owners)


def _runs_in(node: fx.Node, path: str) -> bool:
    """Whether ``node`` is (part of) a call of the module at ``path``: a leaf module call, or any op traced
    inside its forward."""
    def within(p: str) -> bool:
        return p == path or p.startswith(path + ".")
    if node.op == "call_module" and within(str(node.target)):
        return True
    return node.op != "output" and any(within(str(entry[0])) for entry in node.meta.get("nn_module_stack", {}).values())


def split_model(model: nn.Module, boundaries: list[str], method: str = "forward_features") -> list[Segment]:
    """Split ``model.<method>`` after each module path in ``boundaries`` (in execution order).

    What follows the last boundary up to the method's output is one more segment, unless it is only the model's
    head (:func:`is_head`: pooling, normalization, the classifier): then the last boundary's segment runs it too.
    Each segment's ``boundary`` value is its last output (the method's output for the last segment). Returns the
    segments; the state starts as ``{segments[0].input_name: x}``.
    """
    if not boundaries:
        raise ValueError("need at least one boundary module")
    try:
        gm, prefix = _trace(model, method)
    except Exception as e:  # torch.fx raises many kinds of errors on untraceable code
        raise ValueError(f"cannot split {type(model).__name__}: torch.fx could not trace {method}(): {e}") from e
    nodes = list(gm.graph.nodes)
    placeholder = [n for n in nodes if n.op == "placeholder"]
    if len(placeholder) != 1:
        raise ValueError(f"{method}() must take exactly one input to be split, got {len(placeholder)}")
    output_node = next(n for n in nodes if n.op == "output")
    cut_at: list[int] = []
    for b in boundaries:
        target = prefix + b
        idx = [i for i, n in enumerate(nodes) if _runs_in(n, target)]
        if not idx:
            raise ValueError(f"boundary module {b!r} is not called in {type(model).__name__}.{method}(); "
                             f"modules called: {sorted({str(n.target)[len(prefix):] for n in nodes if n.op == 'call_module'})[:20]}")
        cut_at.append(idx[-1])     # the module's last op, functional ones included (a residual add, a concat)
    if cut_at != sorted(cut_at) or len(set(cut_at)) != len(cut_at):
        raise ValueError(f"boundaries must be distinct and in execution order, got {boundaries}")
    out_val = output_node.args[0]
    if not isinstance(out_val, fx.Node):
        raise ValueError(f"{method}() must return one tensor to be split")
    end = nodes.index(out_val)
    if end > cut_at[-1] and not is_head(model, _param_owners(nodes[cut_at[-1] + 1:end + 1], prefix, model)):
        cut_at.append(end)                 # the rest of the network is a segment of its own
    cut_at[-1] = max(cut_at[-1], end)
    part_of = {}
    k = 0
    for i, n in enumerate(nodes):
        if n.op in ("placeholder", "output"):
            continue
        part_of[n] = k
        if k < len(cut_at) and i == cut_at[k]:
            k += 1
    # nodes after the last cut (other than output) belong to the last segment
    for n in nodes:
        if n in part_of and part_of[n] >= len(cut_at):
            part_of[n] = len(cut_at) - 1
    boundary_nodes = [nodes[i] for i in cut_at[:-1]] + [out_val]
    in_name = placeholder[0].name
    segments = []
    for k in range(len(cut_at)):
        members = [n for n in nodes if part_of.get(n) == k]
        member_set = set(members)
        ext_inputs: list[fx.Node] = []
        for n in members:
            for a in n.all_input_nodes:
                if a not in member_set and a not in ext_inputs:
                    ext_inputs.append(a)
        later = {n for n in nodes if part_of.get(n, -1) > k} | {output_node}
        outputs = [n for n in members if any(u in later for u in n.users) or n is boundary_nodes[k]]
        if boundary_nodes[k] not in outputs:
            outputs.append(boundary_nodes[k])
        # values computed before this segment and still needed after it stay in the state
        keep = sorted({a.name for m in nodes if part_of.get(m, -1) > k for a in m.all_input_nodes
                       if part_of.get(a, -1) < k or a.op == "placeholder"} - {o.name for o in outputs})
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for a in ext_inputs:
            env[a] = g.placeholder(a.name)
        for n in members:
            env[n] = g.node_copy(n, lambda a: env[a])
        g.output(tuple(env[o] for o in outputs))
        sub = fx.GraphModule(gm, g)
        names = [in_name if a.op == "placeholder" else a.name for a in ext_inputs]
        segments.append(Segment(sub, names, [o.name for o in outputs], keep, boundary_nodes[k].name))
    segments[0].input_name = in_name
    return segments
