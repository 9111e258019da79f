#!/usr/bin/env bash
# Prepared check for a lent GPU machine (see the device tool): real early exit on CUDA, and the CPU benchmarks
# on a quiet host with 2 threads. Not part of CI.
set -u
export PYTHONPATH=src
python3 - <<'PY'
import torch, dyncnn
from torch.utils.flop_counter import FlopCounterMode
from dyncnn.dynamic import ExitPolicy
print("torch", torch.__version__, "cuda", torch.cuda.is_available())
for name, kw, shape in [("msdnet_cifar", {}, (3, 32, 32)), ("ranet_cifar", {}, (3, 32, 32)),
                        ("multi_exit", {"backbone": "mobilenet_v2", "stages": ["stages.2", "stages.4"]}, (3, 96, 96))]:
    torch.manual_seed(0)
    net = dyncnn.create_model(name, num_classes=10, **kw).eval()
    x = torch.randn(64, *shape)
    with torch.no_grad():
        conf = torch.softmax(net(x)[0], 1).max(1).values
    pol = ExitPolicy([float(conf.median())] + [float("inf")] * (net.num_exits - 2))
    cpu = net.infer(x, pol)
    net.cuda()
    gpu = net.infer(x.cuda(), pol)
    same = torch.equal(cpu.exit_index, gpu.exit_index) and torch.equal(cpu.macs, gpu.macs)
    err = (cpu.logits - gpu.logits.cpu()).abs().max().item()
    with FlopCounterMode(display=False) as fc:
        again = net.infer(x.cuda(), pol)
    print(f"{name}: cuda exits/MACs equal to cpu: {same}; max |logit diff| {err:.2e}; ledger {int(again.macs.sum())} "
          f"vs FlopCounterMode {fc.get_total_flops() // 2}")
PY
python3 benchmarks/bench_early_exit.py --repeats 21
python3 -m dyncnn.cli profile torchvision:mobilenet_v2 --batch-sizes 1 32 --threads 2
