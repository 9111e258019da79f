"""Which reuse pays in the fused cascade (issue 25): the searched cascade's members fused into one network
(:mod:`dyncnn.models.fused_cascade`), each way of reading the earlier stages, against the members alone.

For a finished ``dyncnn frontier --preset headline`` run (its trained static networks; nothing of them is trained
again) and the members its search chose (read from its ``frontier.json``, or ``--members``):

- ``members``: each member alone (the cascade's exits);
- ``none``: exit ``k`` adds the log-probabilities of members ``<= k`` (their product of experts; nothing trained);
- ``pooled``: and exit ``k``'s classifier reads member ``k - 1``'s pooled features (laterals trained ``--epochs``);
- ``deepest``: instead a 1x1 lateral of member ``k - 1``'s deepest feature map into member ``k``'s of the same
  output stride (trained alike).

It prints every exit's validation and test accuracy (the run's splits) and MACs; the frontier's choice
(``laterals="pooled"``) was made on the validation column.

    python benchmarks/bench_fused_cascade.py --run runs/hA_s0 [--epochs 1] [--out runs/fused_bench]

About a minute per variant on 2 cores at 128x128 (``deepest`` two: its gradient flows through the later members).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dyncnn.dynamic.budget import collect_exit_logits
from dyncnn.frontier.runner import (PLAIN_RECIPE, _AsExits, _slug, build_static, data_tensors, load_data,
                                    member_spec, presets, train_one)
from dyncnn.models import create_model
from dyncnn.train.checkpoint import load_checkpoint

from _finished_run import finished_run


def _accuracies(net, split) -> list[float]:
    logits, y = collect_exit_logits(net, split)
    return [float((o.argmax(1) == y).double().mean()) for o in logits]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=None, help="a finished frontier run folder (frontier.json, models/); without it (as in `make bench`) the script says so and skips")
    p.add_argument("--members", nargs="+", default=None, help="static labels, cheapest first (default: the "
                   "run's searched cascade)")
    p.add_argument("--variants", nargs="+", default=["members", "none", "pooled", "deepest"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/fused_bench")
    a = p.parse_args(argv)
    found = finished_run(a.run, __file__, out=Path(a.out) / Path(a.run or ".").name, epochs=a.epochs)
    if found is None:
        return 0
    run, saved, s = found
    seed_result = saved["seeds"][0]
    seed = seed_result["seed"]
    members = a.members or seed_result["cascade_search"]["ranking"][0]["members"]
    torch.set_num_threads(a.threads)
    data = load_data(s)
    specs = {m["label"]: m for m in presets(s.canvas)[s.preset]["static"]}
    trained = []
    for label in members:
        net = build_static(specs[label], num_classes=data["num_classes"], in_chans=data["in_chans"])
        load_checkpoint(run / "models" / f"seed{seed}" / _slug(label) / "last.safetensors", net)
        trained.append(net.eval())
    x1 = data_tensors(data["test"])[0][:1]
    print(f"{run}: seed {seed}, members {' -> '.join(members)}, laterals trained {a.epochs} epoch(s)")
    rows = []
    for variant in a.variants:
        t0 = time.perf_counter()
        if variant == "members":
            val = [_accuracies(_AsExits(m), data["val"])[0] for m in trained]
            test = [_accuracies(_AsExits(m), data["test"])[0] for m in trained]
            macs = [create_model("cascade", members=[member_spec(specs[m]) for m in members],
                                 **{"num_classes": data["num_classes"], "in_chans": data["in_chans"]})
                    .exit_macs(x1)[k] for k in range(len(members))]
        else:
            net = create_model("fused_cascade", members=[member_spec(specs[m]) for m in members], laterals=variant,
                               imta=PLAIN_RECIPE, num_classes=data["num_classes"], in_chans=data["in_chans"])
            net.load_members(trained)
            if variant != "none":
                net, _ = train_one(net, f"fused {variant} {' '.join(members)}", seed, s, data["train"], data["val"],
                                   data["meta"])
            net.eval()
            val, test, macs = _accuracies(net, data["val"]), _accuracies(net, data["test"]), net.exit_macs(x1)
        rows.append({"variant": variant, "val": val, "test": test, "macs": macs,
                     "seconds": time.perf_counter() - t0})
        print(f"  {variant:8s} val {' / '.join(f'{v:.4f}' for v in val)}   test "
              f"{' / '.join(f'{v:.4f}' for v in test)}   MACs {' / '.join(f'{m / 1e6:.2f}M' for m in macs)}   "
              f"({rows[-1]['seconds']:.0f} s)", flush=True)
    out = Path(a.out) / f"{run.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": str(run), "seed": seed, "members": members, "epochs": a.epochs, "rows": rows},
                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
