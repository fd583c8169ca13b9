"""``cdft probe``'s sweep: 12 linear heads trained at once against one head, on cached features.

The features are what ``cdft probe`` reads from the feature cache: a matrix of pooled
features per training image (here generated, class-dependent, at the size of ViT-B/16's
768-wide class token for a BreakHis-sized training set), the validation features and
labels. The timed function is the probe's own
:func:`cdft_core.training.probe.sweep` — vmapped Adam steps with the recipe's schedule,
per-epoch validation of every head and per-head model selection — called with a grid of
4 learning rates x 3 weight decays (12 heads) and with one head. ``ratio`` = 12-head time /
1-head time; ``sequential_x`` = what 12 single-head runs would take / the sweep.
Each time is the best of ``--repeats``, the two alternating.

    python benchmarks/probe.py            # a table
    python benchmarks/probe.py --json     # a JSON object
    python benchmarks/probe.py --images 5000 --dim 768 --epochs 10 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

LRS, WEIGHT_DECAYS = (1e-4, 3e-4, 1e-3, 3e-3), (0.0, 1e-4, 1e-3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--dim", type=int, default=768, help="feature width (ViT-B/16: 768)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="the recipe's batch (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (best used)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu or cuda")
    args = parser.parse_args(argv)
    for option in ("images", "val_images", "dim", "classes", "epochs", "batch_size", "repeats", "threads"):
        if getattr(args, option) < 1:  # 0 would divide by zero or time nothing (Infinity in the JSON)
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    from cdft_core.training.probe import grid, sweep

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(args.classes, args.dim, generator=generator)
    train_y = torch.arange(args.images) % args.classes
    val_y = torch.arange(args.val_images) % args.classes
    train_x = centres[train_y] + 3 * torch.randn(args.images, args.dim, generator=generator)
    val_x = centres[val_y] + 3 * torch.randn(args.val_images, args.dim, generator=generator)
    train_x, train_y, val_x, val_y = (t.to(device) for t in (train_x, train_y, val_x, val_y))
    torch.manual_seed(1)
    head = torch.nn.Linear(args.dim, args.classes).to(device)
    sweeps = {"12 heads": grid(LRS, WEIGHT_DECAYS), "1 head": [(1e-3, 1e-3)]}

    def once(heads: list[tuple[float, float]]) -> float:
        start = time.perf_counter()
        sweep(head, heads, train_x, train_y, val_x, val_y, epochs=args.epochs, batch_size=args.batch_size, seed=1,
              warmup_epochs=1.0, warmup_start_factor=0.01)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once(sweeps["1 head"])  # warm-up: first vmap traces, allocator
    best = {name: float("inf") for name in sweeps}
    for _ in range(args.repeats):
        for name, heads in sweeps.items():
            best[name] = min(best[name], once(heads))
    steps = args.epochs * -(-args.images // args.batch_size)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                         f"{torch.__version__}, {args.threads} threads, device {args.device}",
              "images": args.images, "dim": args.dim, "classes": args.classes, "epochs": args.epochs,
              "batch_size": args.batch_size, "steps": steps, "one_head_s": round(best["1 head"], 3),
              "twelve_heads_s": round(best["12 heads"], 3), "ratio": round(best["12 heads"] / best["1 head"], 2),
              "sequential_x": round(12 * best["1 head"] / best["12 heads"], 1),
              "ms_per_step_12": round(1000 * best["12 heads"] / steps, 3)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.images} x {args.dim} features, {args.epochs} epochs of batch {args.batch_size} ({steps} steps), "
          f"{result['machine']}")
    print(f"1 head   {result['one_head_s']:8.3f} s")
    print(f"12 heads {result['twelve_heads_s']:8.3f} s   ratio {result['ratio']}   "
          f"{result['sequential_x']}x faster than 12 single-head runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
