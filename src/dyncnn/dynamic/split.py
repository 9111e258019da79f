"""Cut a backbone into consecutive segments at chosen modules, so that a multi-exit network can stop after any
of them. Works for any model torch.fx can trace (dyncnn's, torchvision's, most of timm's).

The traced graph of ``forward_features`` (or ``forward``) is partitioned in node order: segment k holds the nodes
after boundary k-1 up to and including the output node of boundary module k. Each segment becomes its own
GraphModule whose inputs are the values it needs from earlier segments and whose outputs are the values later
segments (or its exit head) need, so networks with long-range connections (dense blocks, multi-scale features)
split as well as chains. Running the segments in order equals running the model.
"""
from __future__ import annotations

import torch.fx as fx
from torch import Tensor, nn


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


def _trace(model: nn.Module, method: str) -> fx.GraphModule:
    if method == "forward":
        return fx.symbolic_trace(model)

    class _Call(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return getattr(self.m, method)(x)
    gm = fx.symbolic_trace(_Call(model))
    return gm


def split_model(model: nn.Module, boundaries: list[str], method: str = "forward_features") -> list[Segment]:
    """Split ``model.<method>`` after each module path in ``boundaries`` (in execution order).

    The last segment also runs whatever follows the last boundary up to the method's output; its ``boundary``
    value is that output. Returns the segments; the state starts as ``{segments[0].input_name: x}``.
    """
    if not boundaries:
        raise ValueError("need at least one boundary module")
    prefix = "m." if method != "forward" else ""
    try:
        gm = _trace(model, method)
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
        idx = [i for i, n in enumerate(nodes) if n.op == "call_module"
               and (str(n.target) == target or str(n.target).startswith(target + "."))]
        if not idx:
            raise ValueError(f"boundary module {b!r} is not called in {type(model).__name__}.{method}(); "
                             f"modules called: {sorted({str(n.target)[len(prefix):] for n in nodes if n.op == 'call_module'})[:20]}")
        last = idx[-1]
        # include the trailing non-module ops that only finish this module (e.g. the add of a residual block)
        while last + 1 < len(nodes) and nodes[last + 1].op == "call_function" and \
                str(nodes[last + 1].meta.get("nn_module_stack", {})).find(target) >= 0:
            last += 1
        cut_at.append(last)
    if cut_at != sorted(cut_at) or len(set(cut_at)) != len(cut_at):
        raise ValueError(f"boundaries must be distinct and in execution order, got {boundaries}")
    out_val = output_node.args[0]
    if not isinstance(out_val, fx.Node):
        raise ValueError(f"{method}() must return one tensor to be split")
    if method == "forward" and nodes.index(out_val) > cut_at[-1]:
        cut_at.append(nodes.index(out_val))     # the rest of the network (its own classifier): one more segment
    else:
        cut_at[-1] = max(cut_at[-1], nodes.index(out_val))
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
