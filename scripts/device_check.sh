#!/usr/bin/env bash
# Prepared check for a lent GPU machine (see the device tool), one short script (~5-8 minutes); not part of CI.
#  1. the CUDA tests (tests/train/test_device.py: training, GPU resume, checkpoints loading on the CPU, exits);
#  2. one epoch of `dyncnn train --device cuda --amp` on ScaledMNIST;
#  3. every dynamic family's infer on CUDA: decisions and MAC ledger equal to the CPU's;
#  4. early exit on the GPU at batch 64: realized speedup against the MAC speedup;
#  5. the CPU deployment benchmarks on a quiet host with 2 threads (ExecuTorch vs ONNX Runtime when installed).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}   # keep what the caller adds (carried wheels)
PY=${PY:-python3}
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

echo "== 1. CUDA tests"
$PY -m pytest -q -p no:warnings tests/train/test_device.py -rs

echo "== 2. one epoch on CUDA (bf16 autocast, 2 DataLoader workers)"
$PY -m dyncnn.cli train --model tiny_mobilenet --dataset scaled_mnist --epochs 1 --batch-size 128 --lr 0.1 \
    --device cuda --amp --workers 2 --out "$OUT/train_cuda"

echo "== 3. CPU == CUDA decisions per dynamic family"
$PY - <<'PY'
import torch, dyncnn
from dyncnn.dynamic import ExitPolicy
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False   # compare like with like
exits = [("msdnet_cifar", {}, (3, 32, 32)), ("ranet_cifar", {}, (3, 32, 32)),
         ("multi_exit", {"backbone": "mobilenet_v2", "stages": ["stages.2", "stages.4", "conv_head"]}, (3, 96, 96))]
gated = ["skipnet_resnet20_cifar", "blockdrop_resnet20_cifar", "channel_gated_resnet20_tiny", "moe_resnet_tiny",
         "routing_supernet_tiny", "dynconv_resnet32_cifar", "dynconv_tiny_resnet_mnist", "condconv_tiny_mobilenet_e4",
         "dyconv_tiny_mobilenet", "hyper_tiny_mobilenet", "gfnet_tiny_mnist", "adafocus_tiny",
         "skiprnn_gru_mnist_rows"]
def example(net):
    """The first input shape the model takes (images of 32..128 px, clips, row sequences), as a batch of 16."""
    c, t = getattr(net, "in_chans", None) or 1, getattr(net, "frames", None) or 8
    size = getattr(getattr(net, "cfg", None), "input_size", None)
    shapes = ([(c, size, size)] if size else []) + [(c, 32, 32), (c, 64, 64), (c, 128, 128), (t, c, 64, 64),
                                                    (t, c, 32, 32), (28, 28)]
    for shape in shapes:
        x = torch.rand(16, *shape)
        try:
            with torch.no_grad():
                (net.infer if hasattr(net, "infer") else net)(x)
            return x
        except Exception:
            continue
    raise ValueError("no example input shape fits")
def same(a, b):
    return all(torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()) for f in ("exit_index", "macs")
               if getattr(a, f, None) is not None)
for name, kw, shape in exits:
    torch.manual_seed(0)
    net = dyncnn.create_model(name, num_classes=10, **kw).eval()
    x = torch.randn(64, *shape)
    with torch.no_grad():
        conf = torch.softmax(net(x)[0], 1).max(1).values
    pol = ExitPolicy([float(conf.median())] + [float("inf")] * (net.num_exits - 2))
    cpu = net.infer(x, pol)
    gpu = net.cuda().infer(x.cuda(), pol)
    print(f"{name}: exits/MACs equal {same(cpu, gpu)}; max |logit diff| {(cpu.logits - gpu.logits.cpu()).abs().max():.1e}")
for name in gated:
    try:
        torch.manual_seed(0)
        net = dyncnn.create_model(name, num_classes=10).eval()
        x = example(net)
        with torch.no_grad():
            if not hasattr(net, "infer"):        # dynamic parameters: every sample runs, the kernels differ
                cpu, gpu = net(x), net.cuda()(x.cuda())
                print(f"{name}: forward max |diff| {(cpu - gpu.cpu()).abs().max():.1e}")
                continue
            cpu, gpu = net.infer(x), net.cuda().infer(x.cuda())
        eq = torch.equal(cpu.macs.cpu(), gpu.macs.cpu()) and (getattr(cpu, "choices", None) is None or
                                                              torch.equal(cpu.choices.cpu(), gpu.choices.cpu()))
        print(f"{name}: decisions/MACs equal {eq}")
    except Exception as e:   # a report, not a gate: name what failed
        print(f"{name}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:200]}")
PY

echo "== 4. early exit on the GPU, batch 64: realized vs MAC speedup"
$PY - <<'PY'
import torch, dyncnn
from dyncnn.dynamic import ExitPolicy
torch.manual_seed(0)
net = dyncnn.create_model("msdnet_cifar", num_classes=10).eval().cuda()
x = torch.randn(64, 3, 32, 32, device="cuda")
with torch.no_grad():
    outs = net(x)
left, thr = torch.ones(64, dtype=torch.bool, device="cuda"), []
for k, o in enumerate(outs[:-1]):               # thresholds that spread the samples evenly over the exits
    conf = torch.softmax(o, 1).max(1).values
    t = float(torch.quantile(conf[left].double(), 1 - 1 / (len(outs) - k)))
    thr.append(t); left &= conf < t
pol, full = ExitPolicy(thr), ExitPolicy.never(net.num_exits)
def ms(p, reps=50):
    for _ in range(5): net.infer(x, p)
    torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True); s.record()
    for _ in range(reps): net.infer(x, p)
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / reps
r = net.infer(x, pol)
mac = net.exit_macs(x[:1])[-1] / float(r.macs.double().mean())
tp, tf = ms(pol), ms(full)
print(f"msdnet_cifar cuda b64: policy {tp:.2f} ms, full {tf:.2f} ms, realized {tf / tp:.2f}x, MAC {mac:.2f}x, "
      f"kept {tf / tp / mac:.2f}")
PY

echo "== 5. CPU deployment on a quiet host, 2 threads"
if $PY -c "import executorch" 2>/dev/null; then
    $PY benchmarks/bench_deploy.py --skip A B C --threads 2 --rounds 4 --min-time 2 --json "$OUT/deploy_d.json"
else
    echo "executorch not installed here: ExecuTorch vs ONNX Runtime skipped"
fi
$PY -m dyncnn.cli profile torchvision:mobilenet_v2 --batch-sizes 1 32 --threads 2
