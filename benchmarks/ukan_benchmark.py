# SPDX-License-Identifier: Apache-2.0
"""What the KAN layers of U-KAN cost and what they buy, on the CPU.

1. ``KANLinear`` against an ``nn.Linear`` of the same shape, forward and forward+backward, at the token counts
   and widths U-KAN's KAN blocks see: the bundle's default (3D, a batch of 4 patches of 32x64x32) and the paper's
   2D training (a batch of 8 images of 256x256).
2. Parameters and FLOPs of the bundle's network (``torch.utils.flop_counter``; matrix products and convolutions
   only, so the B-spline bases of KANLinear are not counted) for the default and each option, and its forward
   and forward+backward time on a training batch: the variants taking turns in one process, then each in a
   fresh process with its peak memory (``benchmarks/speed.py``).

On a machine shared with other jobs, ``--threads 1`` gives the steadiest times: with more threads than free
cores, each parallel operation waits for its slowest thread.
3. With ``--train_minutes M`` (or ``--train_epochs N``): the validation Dice and HD95 of the bundle trained on its
   default task for the same budget in three arms (``benchmarks/train_budget.py``, same data split and seed):
   the default (KAN, spline parameters at ``kan_learning_rate`` 1e-2), ``--use_kan False`` (MLP blocks, every
   parameter at ``learning_rate`` 1e-3) and the control ``--kan_learning_rate 1e-3`` (KAN at the MLP's learning
   rate), which separates the effect of the splines from that of the learning-rate split.

    python benchmarks/ukan_benchmark.py                       # 1 and 2, a few minutes on 2 cores
    python benchmarks/ukan_benchmark.py --skip_speed --train_minutes 8 -- --num_workers 2   # 3 only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from networks import UKAN, KANLinear

BENCHMARKS = Path(__file__).resolve().parent
BUNDLE = "ukan_segmentation"

# (where, tokens, width): a KAN block at 1/s resolution of a batch of B inputs sees B * prod(size / s) tokens.
TOKEN_SHAPES = [
    ("bundle 3D, 1/8 decoder", 4 * 4 * 8 * 4, 128),
    ("bundle 3D, 1/16", 4 * 2 * 4 * 2, 160),
    ("bundle 3D, 1/32", 4 * 1 * 2 * 1, 256),
    ("paper 2D, 1/8 decoder", 8 * 32 * 32, 128),
    ("paper 2D, 1/16", 8 * 16 * 16, 160),
    ("paper 2D, 1/32", 8 * 8 * 8, 256),
]
VARIANTS = {
    "default": {},
    "token_shift": {"token_shift": True},
    "use_kan_conv": {"use_kan_conv": True},
    "use_kan=False": {"use_kan": False},
}


def bundle_network_args() -> dict:
    """The bundle's ``network_def`` arguments (its inference config), with ``@`` references resolved."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(BENCHMARKS.parent / "bundles" / BUNDLE / "configs" / "inference.json")
    config = parser.get_parsed_content("network_def", instantiate=False).get_config()
    return {k: v for k, v in config.items() if k != "_target_"}


def fastest_times(modules: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int) -> dict[str, tuple[float, float]]:
    """Seconds of a forward and of a forward+backward of each module on ``x``, the fastest of ``rounds``.

    The modules take turns within each round and the fastest round counts: on a machine shared with other jobs,
    slower rounds measure the other jobs too, and taking turns exposes every module to the same load.
    """
    best = {name: [float("inf"), float("inf")] for name in modules}
    for counted in [False] + [True] * rounds:  # the first round only warms up
        for name, module in modules.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                module(x)
                forward = time.perf_counter() - t0
            t0 = time.perf_counter()
            module(x).float().mean().backward()
            backward = time.perf_counter() - t0
            module.zero_grad(set_to_none=True)
            if counted:
                best[name] = [min(best[name][0], forward), min(best[name][1], backward)]
    return {name: (f, b) for name, (f, b) in best.items()}


def kan_linear_table(threads: int, rounds: int) -> None:
    print(f"\n## KANLinear vs nn.Linear (grid 5, cubic), {threads} thread(s), fastest of {rounds} alternating rounds")
    print(f"{'where':<24} {'tokens':>6} {'width':>5} {'Linear fwd':>11} {'KAN fwd':>9} {'x':>5} "
          f"{'Linear f+b':>11} {'KAN f+b':>9} {'x':>5}")
    for where, tokens, width in TOKEN_SHAPES:
        times = fastest_times({"linear": torch.nn.Linear(width, width), "kan": KANLinear(width, width)},
                              torch.randn(tokens, width), rounds)
        (lin_f, lin_b), (kan_f, kan_b) = times["linear"], times["kan"]
        print(f"{where:<24} {tokens:>6} {width:>5} {lin_f * 1e3:>9.3f}ms {kan_f * 1e3:>7.3f}ms {kan_f / lin_f:>5.1f} "
              f"{lin_b * 1e3:>9.3f}ms {kan_b * 1e3:>7.3f}ms {kan_b / lin_b:>5.1f}")


def network_table(net_args: dict, shape: list[int], threads: int, rounds: int) -> None:
    print(f"\n## UKAN variants on a training batch {shape}, {threads} thread(s), fastest of {rounds} alternating rounds")
    nets = {name: UKAN(**{**net_args, **options}).train() for name, options in VARIANTS.items()}
    times = fastest_times(nets, torch.randn(shape), rounds)
    print(f"{'variant':<14} {'forward s':>10} {'fwd+bwd s':>10}")
    for name, (forward, backward) in times.items():
        print(f"{name:<14} {forward:>10.3f} {backward:>10.3f}")


def params_flops_table(net_args: dict, shape: list[int]) -> None:
    print(f"\n## UKAN{tuple(net_args['channels'])} 3D, parameters and GFLOPs (one forward of {shape}; "
          "matmuls and convs, B-spline bases not counted)")
    print(f"{'variant':<14} {'params':>12} {'KAN params':>11} {'GFLOPs':>8}")
    for name, options in VARIANTS.items():
        net = UKAN(**{**net_args, **options}).eval()
        params = sum(p.numel() for p in net.parameters())
        kan = sum(p.numel() for n, p in net.named_parameters() if "kan" in n)
        # Shapes alone decide the count: on the meta device a large input costs no compute.
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net.to("meta")(torch.zeros(shape, device="meta"))
        print(f"{name:<14} {params:>12,} {kan:>11,} {counter.get_total_flops() / 1e9:>8.2f}")


def speed_table(net_args: dict, shape: list[int], threads: int) -> None:
    print(f"\n## UKAN forward and forward+backward on a training batch (benchmarks/speed.py)")
    for name, options in VARIANTS.items():
        kwargs = json.dumps({**net_args, **options})
        out = subprocess.run([sys.executable, str(BENCHMARKS / "speed.py"), "networks.UKAN", kwargs, "--shapes",
                              ",".join(map(str, shape)), "--repeats", "3", "--threads", str(threads)],
                             capture_output=True, text=True, encoding="utf-8", errors="replace",
                             check=True).stdout.strip().splitlines()
        if name == "default":
            print("variant        " + out[1])
        print(f"{name:<14} " + out[-1])


TRAIN_ARMS = {
    "KAN, kan_learning_rate 1e-2 (default)": [],
    "MLP (use_kan False), 1e-3": ["--use_kan", "False"],
    "KAN, kan_learning_rate 1e-3 (control)": ["--kan_learning_rate", "1e-3"],
}


def train_table(budget: list[str], overrides: list[str]) -> None:
    print(f"\n## {BUNDLE} trained on its default task, budget {' '.join(budget)} per arm", flush=True)
    for name, extra in TRAIN_ARMS.items():
        # options before the bundle name: argparse takes the overrides after "--" only when they follow it
        out = subprocess.run([sys.executable, str(BENCHMARKS / "train_budget.py"), *budget, BUNDLE,
                              "--", *overrides, *extra], capture_output=True, text=True, encoding="utf-8",
                             errors="replace")
        print(f"\n### {name}\n" + (out.stdout.strip() or out.stderr[-3000:]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds (the network table uses a quarter)")
    parser.add_argument("--batch", default="4,1,32,64,32", help="training batch shape for the network timings")
    parser.add_argument("--flops_shapes", nargs="+", default=["1,1,32,64,32", "1,1,96,96,96"],
                        help="input shapes for the FLOP count")
    parser.add_argument("--train_epochs", type=int, default=0, help="also train the three arms for N epochs")
    parser.add_argument("--train_minutes", type=float, default=0, help="also train the three arms for M minutes")
    parser.add_argument("--skip_speed", action="store_true", help="skip parts 1 and 2")
    parser.add_argument("overrides", nargs="*", help="config overrides for both training runs, after --")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net_args = bundle_network_args()
    print(f"torch {torch.__version__}, CPU, {args.threads} threads; bundle network_def: {net_args}")
    if not args.skip_speed:
        kan_linear_table(args.threads, args.rounds)
        for shape in args.flops_shapes:
            params_flops_table(net_args, [int(s) for s in shape.split(",")])
        batch = [int(s) for s in args.batch.split(",")]
        network_table(net_args, batch, args.threads, max(2, args.rounds // 4))
        speed_table(net_args, batch, args.threads)
    if args.train_minutes:
        train_table(["--minutes", str(args.train_minutes)], args.overrides)
    elif args.train_epochs:
        train_table(["--epochs", str(args.train_epochs)], args.overrides)


if __name__ == "__main__":
    main()
