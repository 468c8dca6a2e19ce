#!/usr/bin/env python3
"""Times modkit's training step in PyTorch and compares it with modtrain's.

Reads the JSON that `modtrain bench-step --json` printed (file argument), builds the
same network in PyTorch (conv → BN → ReLU → 2×2 max-pool, residual block, ReLU; the
task modulation ReLU(w_t) after blocks N..5 and fc; L2-normalised embedding), runs
the same minibatch shape (tasks × [k anchors, k positives, k negatives]) through
forward + squared-L2 triplet loss (margin 0.2), backward and Adagrad (lr 0.01,
initial accumulator 0.1), with the same thread count, warm-up and timed steps, and
prints both side by side. Each framework's step is also paired with a GEMM of its
own, of modtrain's peak size, timed just before and after it (the better of the
two; PyTorch's a 1×1 convolution through oneDNN or cuDNN, modtrain's matmul in its
JSON), so that the fraction of the peak divides out a shared machine's slow
moments. Runs on the GPU when modtrain's run did (`--device cuda`),
with PyTorch's default CUDA settings (cuDNN; TF32 convolutions allowed, as shipped);
`TORCH_TF32=0` turns TF32 off for a strict float32 comparison.
Run by scripts/compare_torch.sh and scripts/gpu/bench.sh.
"""
import os
import json
import resource
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F


class ConvBn(nn.Module):
    def __init__(self, cin, cout, pad, bn):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=pad, bias=not bn)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1) if bn else nn.Identity()

    def forward(self, x):
        return self.bn(self.conv(x))


class Block(nn.Module):
    def __init__(self, cin, c, bn):
        super().__init__()
        self.conv = ConvBn(cin, c, 0, bn)
        self.res1 = ConvBn(c, c, 1, bn)
        self.res2 = ConvBn(c, c, 1, bn)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.conv(x)), 2)
        r = self.res2(F.relu(self.res1(y)))
        return F.relu(y + r)


class Net(nn.Module):
    def __init__(self, spec, tasks, modulated):
        super().__init__()
        w, bn = spec["widths"], spec["batch_norm"]
        self.conv1 = ConvBn(spec["in_channels"], w[0], 0, bn)
        self.blocks = nn.ModuleList(Block(w[i], w[i + 1], bn) for i in range(4))
        size = spec["input_size"] - 2
        for _ in range(4):
            size = (size - 2) // 2
        emb = spec["embedding"]
        self.fc = nn.Linear(w[4] * size * size, emb, bias=not bn)
        self.fc_bn = nn.BatchNorm1d(emb) if bn else nn.Identity()
        self.first = spec["first_modulated"]
        channels = [w[k - 1] for k in range(self.first, 6)] + [emb]
        self.mod = nn.ParameterList(
            nn.Parameter(torch.ones(tasks, c)) for c in channels
        ) if modulated else None

    def modulate(self, x, i, ids):
        if self.mod is None:
            return x
        s = F.relu(self.mod[i])[ids]
        return x * (s[:, :, None, None] if x.dim() == 4 else s)

    def forward(self, x, ids):
        x = F.relu(self.conv1(x))
        m = 0
        for k, block in enumerate(self.blocks, start=2):
            x = block(x)
            if k >= self.first:
                x = self.modulate(x, m, ids)
                m += 1
        e = self.fc_bn(self.fc(x.flatten(1)))
        e = self.modulate(e, m, ids)
        return F.normalize(e, dim=1, eps=1e-12)


def triplet_loss(emb, tasks, k, margin=0.2):
    e = emb.view(tasks, 3, k, -1)
    a, p, n = e[:, 0], e[:, 1], e[:, 2]
    dp = (a - p).pow(2).sum(-1)
    dn = (a - n).pow(2).sum(-1)
    return F.relu(dp - dn + margin).mean()


def main():
    rs = json.load(open(sys.argv[1]))
    if rs["mining"] != "sampled" or rs["optimizer"] != "adagrad":
        sys.exit("torch_step.py mirrors sampled mining with adagrad only")
    if rs["variant"] not in ("modulated", "shared"):
        sys.exit(f"torch_step.py mirrors modulated and shared, not {rs['variant']}")
    spec = rs["net"]
    if spec["modulation"] != "vector":
        sys.exit("torch_step.py mirrors vector modulation only")
    torch.manual_seed(0)
    torch.set_num_threads(rs["threads"])
    cuda = rs["device"].lower().startswith("cuda")
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda and os.environ.get("TORCH_TF32") == "0":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t, k = rs["tasks"], rs["batch_per_task"]
    net = Net(spec, t, rs["variant"] == "modulated").train().to(dev)
    opt = torch.optim.Adagrad(net.parameters(), lr=0.01, initial_accumulator_value=0.1)
    s = spec["input_size"]
    x = torch.randn(t * 3 * k, spec["in_channels"], s, s, device=dev)
    ids = torch.arange(t, device=dev).repeat_interleave(3 * k)
    # PyTorch's own peak, timed between the steps as modtrain times its matmul (best
    # of 3 after one warm-up run): a 1×1 convolution of modtrain's matmul size, a
    # GEMM through oneDNN as PyTorch's 3×3 convolutions are (Debian's torch.mm
    # runs on the reference BLAS, at a few GFLOP/s).
    n = rs["gemm_size"]
    mx = torch.full((1, n, n // 32, 32), 0.5, device=dev)  # n pixels of n channels
    mw = torch.full((n, n, 1, 1), 0.25, device=dev)

    def mm_gflops():
        best = float("inf")
        with torch.no_grad():
            F.conv2d(mx, mw)  # the warm-up run, untimed
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                F.conv2d(mx, mw)
                sync()
                best = min(best, time.perf_counter() - t0)
        return 2 * n**3 / best / 1e9

    times = []
    between = [mm_gflops()] if rs["warmup"] == 0 else []
    for step in range(rs["warmup"] + len(rs["steps"])):
        t0 = time.perf_counter()
        loss = triplet_loss(net(x, ids), t, k)
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step >= rs["warmup"]:
            times.append((t1 - t0, t2 - t1, t3 - t2))
        if step + 1 >= rs["warmup"]:
            between.append(mm_gflops())

    med = [statistics.median(col) for col in zip(*times)]
    torch_step = sum(med)
    ours = rs["median"]
    ours_step = ours["forward"] + ours["backward"] + ours["update"]
    flops = rs["flops_per_step"]
    peak = rs["gemm_peak_gflops"]
    where = torch.cuda.get_device_name() if cuda else f"{rs['threads']} threads"
    print(
        f"{rs['spec']} {s}×{s}, {rs['variant']}, {rs['images_per_step']} images per step, "
        f"{where}; PyTorch {torch.__version__}"
    )
    print(f"| phase (median ms) | modtrain | PyTorch | modtrain ÷ PyTorch |")
    print(f"|---|---|---|---|")
    for name, a, b in [
        ("forward", ours["forward"], med[0]),
        ("backward", ours["backward"], med[1]),
        ("update", ours["update"], med[2]),
        ("step (no data)", ours_step, torch_step),
    ]:
        print(f"| {name} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}× |")
    print(
        f"| step ÷ forward | {ours_step / ours['forward']:.2f} | {torch_step / med[0]:.2f} | |"
    )
    print(
        f"| % of GEMM peak ({peak:.1f} GFLOP/s, {rs.get('gemm_kernels', '?')}) | {100 * flops / ours_step / 1e9 / peak:.0f}% "
        f"| {100 * flops / torch_step / 1e9 / peak:.0f}% | |"
    )

    def paired(times, between):
        own = [max(a, b) for a, b in zip(between, between[1:])]
        return statistics.median(flops / sum(ts) / 1e9 / p for ts, p in zip(times, own))

    ours_between = rs["between_steps_gflops"]
    ours_steps = [[v["data"], v["forward"], v["backward"], v["update"]] for v in rs["steps"]]
    # The same pairing as modtrain's (`bench::paired_fraction`), or the rows differ.
    assert abs(paired(ours_steps, ours_between) - rs["paired_peak_fraction"]) < 1e-9
    print(
        f"| % of the peak paired per step (each against the better matmul just before and after it: "
        f"modtrain's, {min(ours_between):.0f}–{max(ours_between):.0f}; PyTorch's own 1×1 conv, "
        f"{min(between):.0f}–{max(between):.0f} GFLOP/s) "
        f"| {100 * rs['paired_peak_fraction']:.0f}% | {100 * paired(times, between):.0f}% | |"
    )
    n = rs["images_per_step"]
    print(
        f"| images per second | {n / ours_step:.0f} | {n / torch_step:.0f} | "
        f"{torch_step / ours_step:.2f}× |"
    )
    ours_rss = rs.get("peak_resident_bytes")
    if ours_rss:
        # Linux's ru_maxrss is in KiB. modtrain's count holds its synthetic dataset
        # (6,000 images), PyTorch's the interpreter and its libraries.
        torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(
            f"| peak resident memory, MB (modtrain: with its dataset; PyTorch: with the "
            f"interpreter) | {ours_rss / 1e6:.0f} | {torch_rss / 1e6:.0f} | "
            f"{ours_rss / torch_rss:.2f}× |"
        )
    if cuda:
        print(f"PyTorch peak GPU memory allocated: {torch.cuda.max_memory_allocated() >> 20} MiB")
    print(f"modtrain data (batch assembly, not timed in PyTorch): {ours['data'] * 1e3:.1f} ms")
    ratio = ours_step / torch_step
    print(f"modtrain step = {ratio:.2f} × PyTorch's (target ≤ 1.2×)")


if __name__ == "__main__":
    main()
