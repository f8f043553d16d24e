# SPDX-License-Identifier: Apache-2.0
"""
Speed of the collection's networks on the CPU or a GPU: against the authors' own code, alone, per layer, and in
FLOPs.

Networks are named configurations (``list`` shows them), found rather than listed: every configuration the
networks register (``networks.list_networks()``, ``dnet_official`` as ``dnet-official``, with the input it
registers), and every bundle's ``network_def`` on one of its training batches (``<short name>-bundle``: the
first word of the bundle's name, ``dnet-bundle``, ``csam-bundle``). So a figure in a card is one command.
``NAME:key=value,...`` overrides constructor arguments (values as JSON, e.g.
``dnet-official:use_checkpointing=true``).

    python -m benchmarks.speed list
    # ours against the authors' code from a local clone (nothing of it is copied here); interleaved, medians
    python -m benchmarks.speed compare dnet-official --reference /path/to/DLK
    python -m benchmarks.speed compare transunet-r50-vit-b16 --reference /path/to/TransUNet
    python -m benchmarks.speed compare ukan-official --reference /path/to/U-KAN
    # on a GPU, also ours as the bundles train there (bf16 autocast, channels-last input) and compiled
    python -m benchmarks.speed compare dnet-official --reference /path/to/DLK --device cuda --gpu-default --compile
    # ours alone, several configurations taking turns; --memory adds peak memory, each in a fresh process
    python -m benchmarks.speed time dnet-paper dnet-paper:use_checkpointing=true --memory
    python -m benchmarks.speed time ukan-bundle ukan-bundle:use_kan=false ukan-bundle:token_shift=true
    python -m benchmarks.speed kan-layers                      # KANLinear against nn.Linear at U-KAN's shapes
    python -m benchmarks.speed flops ukan-bundle ukan-bundle:use_kan=false --shape 1,1,96,96,96

Training arms (U-KAN's KAN against MLP, CSAM's ablation) are ``python -m benchmarks.ablation``.

Timing (``compare``, ``time``): every network runs in training mode; a "forward" is one call under
``torch.no_grad()``, a "forward+backward" a call and ``backward()`` of the sum of the outputs' means (every
deep-supervision output included). After one warm-up round the networks take turns for ``--rounds`` rounds and the
medians count: on a machine shared with other jobs, taking turns exposes every network to the same load, so ratios
measured side by side are steadier than times. ``--plain`` adds our network with ``networks.blocks.fast.plain_ops()``
(plain PyTorch ops, channels-first), the path the optimised one is tested against, so the gain of those levers shows
on its own; ``--compile`` adds ours under ``torch.compile`` (its compile time is printed); ``--bf16`` adds ours under
bfloat16 autocast (other numbers than float32: how far its output moves is printed); ``--gpu-default`` adds ours as
the bundles train on a GPU (bfloat16 autocast and channels-last input; with ``--compile`` also compiled so).
``--device cuda`` runs everything on the GPU, synchronising before each clock reading; the first round (cuDNN's
autotuner times its candidate kernels for each new shape) is the warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from benchmarks.reference import official_dnet, official_transunet, official_ukan
from bundletools.bundles import bundle_dir, short_names
from networks import KANLinear, create_network, list_networks, network_entry
from networks.blocks.fast import plain_ops

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Config:
    """A named network configuration: how to build ours, its input, and (optionally) the authors' equivalent."""

    description: str
    build: Callable[..., nn.Module]
    shape: Callable[[], list[int]]
    reference: Callable[[str], nn.Module] | None = None
    reference_repo: str = ""


def _bundle_config(bundle: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle_dir(bundle) / "configs" / "train.json")
    return parser


def _bundle_network(bundle: str, **overrides) -> nn.Module:
    """The bundle's ``network_def`` with its defaults, and ``overrides`` of its arguments."""
    parser = _bundle_config(bundle)
    for key, value in overrides.items():
        parser[f"network_def#{key}"] = value
    return parser.get_parsed_content("network_def")


def _bundle_batch(bundle: str) -> list[int]:
    """One training batch of the bundle: batch_size * samples_per_case patches of roi_size."""
    parser = _bundle_config(bundle)
    batch = parser.get_parsed_content("batch_size") * parser.get_parsed_content("samples_per_case")
    return [batch, parser.get_parsed_content("in_channels"), *parser.get_parsed_content("roi_size")]


# the authors' network for a registered configuration, from a local clone of their repository
REFERENCES: dict[str, tuple[Callable[[str], nn.Module], str]] = {
    "dnet_official": (lambda path: official_dnet(path, 1, 3), "sotiraslab/DLK"),
    "transunet_r50_vit_b16": (lambda path: official_transunet(path, 9), "Beckschen/TransUNet"),
    "ukan_official": (lambda path: official_ukan(path, 1), "CUHK-AIM-Group/U-KAN"),
}


def configurations() -> dict[str, Config]:
    """Every named configuration: the networks' registered ones, then each bundle's ``network_def``."""
    configs = {}
    for name in list_networks():
        entry = network_entry(name)
        reference, repo = REFERENCES.get(name, (None, ""))
        configs[name.replace("_", "-")] = Config(entry.description, partial(create_network, name),
                                                 partial(list, entry.input_shape), reference, repo)
    for bundle, short in short_names().items():
        configs[f"{short.replace('_', '-')}-bundle"] = Config(
            f"the {bundle} bundle's network_def on one of its training batches",
            partial(_bundle_network, bundle), partial(_bundle_batch, bundle))
    return configs


def parse_spec(spec: str) -> tuple[str, dict]:
    """``name[:key=value,...]`` -> (name, overrides); values are JSON (true, 3, [1, 2]) or else strings."""
    name, _, rest = spec.partition(":")
    known = configurations()
    if name not in known:
        sys.exit(f"unknown configuration {name!r}; known: {', '.join(known)}")
    overrides = {}
    for item in filter(None, rest.split(",")) if rest else []:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"{spec}: expected key=value after ':', got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def loss_of(output) -> torch.Tensor:
    outputs = output if isinstance(output, (list, tuple)) else [output]
    return sum(o.float().mean() for o in outputs)


def clock(device: torch.device | str = "cpu") -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far (GPU work is asynchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the channels-last memory layout of its rank (the layout cuDNN's half-precision kernels run in)."""
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


@dataclasses.dataclass
class Runner:
    """A network, its input and how to call it; collects the times of its forward and forward+backward calls."""

    label: str
    net: nn.Module
    x: torch.Tensor
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    variant: str = "ours"  # official, ours, plain, bf16, gpu-default, compile, compile-gpu-default
    setup_s: float = 0.0  # the compilation (the first forward+backward) of a compiled network
    forward: list[float] = dataclasses.field(default_factory=list)
    forward_backward: list[float] = dataclasses.field(default_factory=list)

    def step(self) -> tuple[float, float]:
        device = self.x.device
        with self.context():
            with torch.no_grad():
                start = clock(device)
                self.net(self.x)
                forward = clock(device) - start
            start = clock(device)
            loss_of(self.net(self.x)).backward()
            forward_backward = clock(device) - start
        self.net.zero_grad(set_to_none=True)
        return forward, forward_backward


def take_turns(runners: Sequence[Runner], rounds: int) -> None:
    """One warm-up round, then ``rounds`` rounds in which every runner does a forward and a forward+backward."""
    for r in range(rounds + 1):
        for runner in runners:
            forward, forward_backward = runner.step()
            if r:
                runner.forward.append(forward)
                runner.forward_backward.append(forward_backward)
        print(f"  round {r}/{rounds}" + (" (warm-up)" if r == 0 else ""), end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def build_runners(spec: str, args, reference: str | None = None) -> list[Runner]:
    """Ours for ``spec`` (and the authors' network from ``reference``, first), on one random input."""
    name, overrides = parse_spec(spec)
    config = configurations()[name]
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.shape or config.shape(), device=device)
    print(f"{spec}: {config.description}; input {'x'.join(map(str, x.shape))}")
    ours = config.build(**overrides).train().to(device)
    runners = []
    if reference is not None:
        if config.reference is None:
            sys.exit(f"{name}: no reference implementation is known for this configuration")
        official = config.reference(reference).train().to(device)
        runners.append(Runner(f"official ({config.reference_repo})", official, x, variant="official"))
    runners.append(Runner(f"ours ({spec})", ours, x))
    if args.plain:
        runners.append(Runner(f"ours ({spec}), plain ops", ours, x, plain_ops, "plain"))
    bf16 = partial(bf16_autocast, device.type)
    if args.bf16:
        runners.append(Runner(f"ours ({spec}), bf16 autocast", ours, x, bf16, "bf16"))
    if getattr(args, "gpu_default", False):
        runners.append(Runner(f"ours ({spec}), bf16 + channels-last", ours, channels_last(x), bf16, "gpu-default"))
    if args.compile:
        compiled = torch.compile(ours)
        variants = [("", x, contextlib.nullcontext, "compile")]
        if getattr(args, "gpu_default", False):
            variants.append((", bf16 + channels-last", channels_last(x), bf16, "compile-gpu-default"))
        for suffix, inputs, context, variant in variants:
            start = clock(device)
            with context():
                loss_of(compiled(inputs)).backward()
            ours.zero_grad(set_to_none=True)
            seconds = clock(device) - start
            print(f"torch.compile{suffix}: the first forward+backward (compilation) took {seconds:.0f} s")
            runners.append(Runner(f"ours ({spec}), torch.compile{suffix}", compiled, inputs, context, variant, seconds))
    return runners


def bf16_autocast(device_type: str = "cpu") -> contextlib.AbstractContextManager:
    return torch.autocast(device_type, dtype=torch.bfloat16)


def header(args) -> None:
    where = f"CPU, {args.threads} threads"
    if torch.device(args.device).type == "cuda":
        where = f"{torch.cuda.get_device_name(args.device)}, CUDA {torch.version.cuda}"
    print(f"torch {torch.__version__}, {where}, median of {args.rounds} rounds taking turns after a warm-up round")


def print_table(runners: Sequence[Runner], first_is_reference: bool) -> None:
    print(f"| {'network':<48} | {'parameters':>12} | {'forward s':>9} | {'fwd+bwd s':>9} |")
    print(f"|{'-' * 50}|{'-' * 14}|{'-' * 11}|{'-' * 11}|")
    for runner in runners:
        forward, forward_backward = statistics.median(runner.forward), statistics.median(runner.forward_backward)
        print(f"| {runner.label:<48} | {num_params(runner.net):>12,} | {forward:>9.3f} | {forward_backward:>9.3f} |")
    if first_is_reference:
        reference = runners[0]
        for runner in runners[1:]:
            f = statistics.median(reference.forward) / statistics.median(runner.forward)
            fb = statistics.median(reference.forward_backward) / statistics.median(runner.forward_backward)
            print(f"ratio official / {runner.label}: forward {f:.2f}x, forward+backward {fb:.2f}x")


def print_bf16_deviation(runners: Sequence[Runner]) -> None:
    """How far bf16 autocast moves a network's output from its float32 output (eval mode, same input)."""
    for runner in runners:
        if runner.variant not in ("bf16", "gpu-default"):
            continue
        runner.net.eval()
        with torch.no_grad():
            exact = runner.net(runner.x)
            with runner.context():
                approx = runner.net(runner.x)
        runner.net.train()
        exact, approx = (o[0] if isinstance(o, (list, tuple)) else o for o in (exact, approx))
        deviation = (approx.float() - exact).abs().max() / exact.abs().max()
        print(f"{runner.label}: the output differs from float32 by up to {deviation:.1e} of its largest value")


def cmd_compare(args) -> None:
    runners = build_runners(args.config, args, reference=args.reference)
    header(args)
    take_turns(runners, args.rounds)
    print_table(runners, first_is_reference=True)
    if num_params(runners[0].net) != num_params(runners[1].net):
        print("note: the parameter counts differ, so this is not the same configuration")
    print_bf16_deviation(runners)
    if args.memory:
        print_memory([(runners[0].label, args.config, args.reference), (runners[1].label, args.config, None)], args)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(spec: str, shape: list[int] | None, reference: str | None) -> dict:
    """Peak resident memory of one forward+backward of ours (or of the authors' network), in this fresh process."""
    name, overrides = parse_spec(spec)
    config = configurations()[name]
    net = (config.reference(reference) if reference else config.build(**overrides)).train()
    x = torch.randn(shape or config.shape())
    base = _rss_mb()
    loss_of(net(x)).backward()
    # the high-water mark of this process's memory map (ru_maxrss would carry the parent's over from the fork)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return {"peak_rss_mb": peak, "activation_mb": peak - base}


def cmd_time(args) -> None:
    runners = [runner for spec in args.configs for runner in build_runners(spec, args)]
    header(args)
    take_turns(runners, args.rounds)
    print_table(runners, first_is_reference=False)
    print_bf16_deviation(runners)
    if args.memory:
        print_memory([(spec, spec, None) for spec in args.configs], args)


def print_memory(rows: list[tuple[str, str, str | None]], args) -> None:
    """Peak memory of (label, spec, reference path or None) rows, each measured in a fresh process."""
    print("\npeak memory of one forward+backward, each network in a fresh process (activations: the peak minus the "
          "memory after the network was built)")
    print(f"| {'network':<48} | {'peak RSS MB':>11} | {'activations MB':>14} |")
    print(f"|{'-' * 50}|{'-' * 13}|{'-' * 16}|")
    for label, spec, reference in rows:
        command = [sys.executable, "-m", "benchmarks.speed", "memory-child", spec, "--threads", str(args.threads)]
        if args.shape:
            command += ["--shape", ",".join(map(str, args.shape))]
        if reference:
            command += ["--reference", reference]
        out = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO)
        if out.returncode != 0:
            sys.exit(f"{label}: the memory measurement failed\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {label:<48} | {result['peak_rss_mb']:>11.0f} | {result['activation_mb']:>14.0f} |")


# (where, tokens, width): a KAN block at 1/s resolution of a batch of B inputs sees B * prod(size / s) tokens.
KAN_TOKEN_SHAPES = [
    ("bundle 3D, 1/8 decoder", 4 * 4 * 8 * 4, 128),
    ("bundle 3D, 1/16", 4 * 2 * 4 * 2, 160),
    ("bundle 3D, 1/32", 4 * 1 * 2 * 1, 256),
    ("paper 2D, 1/8 decoder", 4 * 32 * 32, 128),
    ("paper 2D, 1/16", 4 * 16 * 16, 160),
    ("paper 2D, 1/32", 4 * 8 * 8, 256),
]


def cmd_kan_layers(args) -> None:
    print(f"KANLinear (grid 5, cubic) against nn.Linear of the same shape; {args.threads} threads, median of "
          f"{args.rounds} rounds taking turns; 'plain' is KANLinear with the Cox-de Boor bases (plain_ops)")
    print(f"| {'where':<22} | {'tokens':>6} | {'width':>5} | {'Linear f+b ms':>13} | {'KAN f+b ms':>10} | "
          f"{'KAN plain f+b ms':>16} | {'KAN / Linear':>12} |")
    print(f"|{'-' * 24}|{'-' * 8}|{'-' * 7}|{'-' * 15}|{'-' * 12}|{'-' * 18}|{'-' * 14}|")
    for where, tokens, width in KAN_TOKEN_SHAPES:
        kan, x = KANLinear(width, width), torch.randn(tokens, width)
        linear = nn.Linear(width, width)
        runners = [Runner("linear", linear, x), Runner("kan", kan, x), Runner("plain", kan, x, plain_ops)]
        take_turns(runners, args.rounds)
        linear, fast, plain = (statistics.median(r.forward_backward) * 1e3 for r in runners)
        print(f"| {where:<22} | {tokens:>6} | {width:>5} | {linear:>13.3f} | {fast:>10.3f} | {plain:>16.3f} | "
              f"{fast / linear:>12.1f} |")


def cmd_flops(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    print("parameters and GFLOPs of one forward (matrix products and convolutions only: B-spline bases, norms and "
          "activations are not counted)")
    print(f"| {'network':<48} | {'input':<18} | {'parameters':>12} | {'KAN params':>11} | {'GFLOPs':>8} |")
    print(f"|{'-' * 50}|{'-' * 20}|{'-' * 14}|{'-' * 13}|{'-' * 10}|")
    for spec in args.configs:
        name, overrides = parse_spec(spec)
        config = configurations()[name]
        net = config.build(**overrides).eval()
        shape = args.shape or config.shape()
        kan = sum(p.numel() for n, p in net.named_parameters() if "kan" in n)
        # shapes alone decide the count: on the meta device a large input costs no compute
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net.to("meta")(torch.zeros(shape, device="meta"))
        print(f"| {spec:<48} | {'x'.join(map(str, shape)):<18} | {num_params(net):>12,} | {kan:>11,} | "
              f"{counter.get_total_flops() / 1e9:>8.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    common.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up round (default 5)")
    common.add_argument("--shape", type=lambda s: [int(v) for v in s.split(",")], help="input, e.g. 1,1,96,96,96")
    common.add_argument("--device", default="cpu", help="cpu (default) or cuda[:n]")
    timing = argparse.ArgumentParser(add_help=False)
    timing.add_argument("--plain", action="store_true", help="also time ours with plain PyTorch ops (plain_ops)")
    timing.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    timing.add_argument("--bf16", action="store_true", help="also time ours under bfloat16 autocast")
    timing.add_argument("--gpu-default", action="store_true",
                        help="also time ours as the bundles train on a GPU: bf16 autocast, channels-last input")
    sub.add_parser("list", help="the named configurations")
    p = sub.add_parser("compare", parents=[common, timing], help="ours against the authors' code, side by side")
    p.add_argument("config", help="a configuration with a reference, e.g. dnet-official")
    p.add_argument("--reference", required=True, help="path to a local clone of the authors' repository")
    p.add_argument("--memory", action="store_true", help="also the peak memory, each in a fresh process")
    p = sub.add_parser("time", parents=[common, timing], help="ours alone; several configurations take turns")
    p.add_argument("configs", nargs="+")
    p.add_argument("--memory", action="store_true", help="also the peak memory, each in a fresh process")
    p = sub.add_parser("memory-child", parents=[common])
    p.add_argument("spec")
    p.add_argument("--reference")
    sub.add_parser("kan-layers", parents=[common], help="KANLinear against nn.Linear")
    p = sub.add_parser("flops", parents=[common], help="parameters and GFLOPs")
    p.add_argument("configs", nargs="+")
    args = parser.parse_args()
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    # cuDNN's autotuner for every network alike (the bundles train with it; a fixed choice would favour none)
    torch.backends.cudnn.benchmark = True
    if args.command == "list":
        for name, config in configurations().items():
            ref = f" [reference: {config.reference_repo}]" if config.reference else ""
            print(f"{name:<24} {config.description}{ref}")
    elif args.command == "memory-child":
        print(json.dumps(memory_child(args.spec, args.shape, args.reference)))
    else:
        {"compare": cmd_compare, "time": cmd_time, "kan-layers": cmd_kan_layers, "flops": cmd_flops}[args.command](args)


if __name__ == "__main__":
    main()
