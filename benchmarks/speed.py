# SPDX-License-Identifier: Apache-2.0
"""Forward and forward+backward time and peak memory of a network on the CPU.

Each input size runs in a fresh process, so its peak resident memory (``ru_maxrss``) belongs to that size alone;
"activation memory" is the peak minus the resident memory after the model was built.

    python benchmarks/speed.py networks.DNet '{"spatial_dims": 3, "in_channels": 1, "out_channels": 16}' --shapes 1,1,64,64,64 1,1,96,96,96
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(target: str, kwargs: dict, shape: list[int], repeats: int, threads: int) -> dict:
    import pydoc

    import torch

    torch.set_num_threads(threads)
    net = pydoc.locate(target)(**kwargs)
    params = sum(p.numel() for p in net.parameters())
    x = torch.randn(*shape)
    base = _rss_mb()
    net.eval()
    with torch.no_grad():
        net(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            net(x)
        forward = (time.perf_counter() - t0) / repeats
    net.train()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = net(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        sum(o.float().mean() for o in outs).backward()
        net.zero_grad(set_to_none=True)
    backward = (time.perf_counter() - t0) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"shape": shape, "params": params, "forward_s": forward, "forward_backward_s": backward,
            "peak_rss_mb": peak, "activation_mb": peak - base, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="dotted path of the network class, e.g. networks.DNet")
    parser.add_argument("kwargs", help="constructor arguments as JSON")
    parser.add_argument("--shapes", nargs="+", required=True, help="input shapes, e.g. 1,1,96,96,96")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shape = [int(s) for s in args.shapes[0].split(",")]
        print(json.dumps(measure(args.target, json.loads(args.kwargs), shape, args.repeats, args.threads)))
        return
    import torch

    print(f"{args.target}({args.kwargs}) on CPU, torch {torch.__version__}, {args.threads} threads, "
          f"mean of {args.repeats} runs after a warm-up forward")
    print(f"{'input':>22} {'params':>12} {'forward s':>10} {'fwd+bwd s':>10} {'peak RSS MB':>12} {'activ. MB':>10}")
    for shape in args.shapes:
        out = subprocess.run([sys.executable, __file__, args.target, args.kwargs, "--shapes", shape, "--repeats",
                              str(args.repeats), "--threads", str(args.threads), "--child"],
                             capture_output=True, text=True, encoding="utf-8", errors="replace", check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{shape:>22} {r['params']:>12,} {r['forward_s']:>10.3f} {r['forward_backward_s']:>10.3f} "
              f"{r['peak_rss_mb']:>12.0f} {r['activation_mb']:>10.0f}")


if __name__ == "__main__":
    main()
