"""CDTM: cdft's one-matmul token mixing against the reference's expanded B×K×N×N sum.

Measures forward + backward time and peak memory of one CDTM (L=1, r=4) at the paper's
ViT-B shape (B=8, N=196, C=768, K=300) and ConvNeXt-B shape (B=8, N=49, C=1024, K=300),
both formulations in the same process, same parameters, same input.

    python benchmarks/cdtm.py            # a table
    python benchmarks/cdtm.py --json     # a JSON list, one object per shape
    python benchmarks/cdtm.py --threads 2 --device cuda   # other settings

Peak memory is the high-water mark of tensor memory allocated during one forward +
backward pass above what existed before it (parameters and input), from the allocator's
own events: on CPU the PyTorch profiler's memory records (every allocation and free,
replayed in order), on CUDA ``torch.cuda.max_memory_allocated``. Time is the best of
``--repeats`` interleaved runs after one warm-up, measured without the profiler.

Each shape's object also holds, under ``mixing``, the same figures for the part where
the formulations differ (the mixing weights, Σ_k a_k·T_k and M·Y of one block), since
the shared linear layers and MLP dominate the whole module's time on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import torch

from cdft_core.models.adapters import Cdtm

SHAPES = {
    "vit_b": {"B": 8, "N": 196, "C": 768, "K": 300},
    "convnext_b": {"B": 8, "N": 49, "C": 1024, "K": 300},
}


def naive_forward(module: Cdtm, x: torch.Tensor) -> torch.Tensor:
    """The same CDTM with step 3 as the reference wrote it: expand to B×K×N×N, sum over K."""
    x = module.norm_in(x)
    for block in module.blocks:
        y = block.norm1(x)
        a = block.mixing_weights(y)
        m = (a[:, :, None, None] * block.mixing[None]).sum(dim=1)
        z = block.drop(block.proj(torch.bmm(m, y)))
        x = z + block.mlp(block.norm2(z))
    return module.norm_out(x).mean(dim=1)


def ours_forward(module: Cdtm, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def ours_mixing(module: Cdtm, y: torch.Tensor) -> torch.Tensor:
    """Steps 1–3 and M·Y of the first block only: where the two formulations differ."""
    block = module.blocks[0]
    a = block.mixing_weights(y)
    b, n, _ = y.shape
    m = (a @ block.mixing.reshape(block.num_centres, n * n)).reshape(b, n, n)
    return torch.bmm(m, y)


def naive_mixing(module: Cdtm, y: torch.Tensor) -> torch.Tensor:
    block = module.blocks[0]
    a = block.mixing_weights(y)
    m = (a[:, :, None, None] * block.mixing[None]).sum(dim=1)
    return torch.bmm(m, y)


def step(forward, module: Cdtm, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    forward(module, x).sum().backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(ours, naive, module: Cdtm, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Best-of-``repeats`` milliseconds for each, runs interleaved after one warm-up each.

    Interleaving and taking the minimum keep other processes on a shared machine from
    favouring one formulation: interference only ever adds time.
    """
    best = {ours: float("inf"), naive: float("inf")}
    for fn in (ours, naive):
        step(fn, module, x)  # warm-up
    for _ in range(repeats):
        for fn in (ours, naive):
            synchronize(x.device)
            start = time.perf_counter()
            step(fn, module, x)
            synchronize(x.device)
            best[fn] = min(best[fn], (time.perf_counter() - start) * 1000)
    return best[ours], best[naive]


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's native start/stop lines (written to fd 2, not via Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(forward, module: Cdtm, x: torch.Tensor) -> int:
    """Highest tensor memory held during one forward + backward, above the starting point."""
    module.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        step(forward, module, x)
        synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(forward, module, x)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
        key=lambda e: e.start_ns(),
    )
    if not events:
        raise RuntimeError("the profiler recorded no memory events; cannot measure peak memory")
    held = peak = 0
    for event in events:
        held += event.nbytes()  # positive: allocation, negative: free
        peak = max(peak, held)
    return peak


def compare(ours, naive, module: Cdtm, x: torch.Tensor, repeats: int) -> dict[str, float]:
    ours_ms, naive_ms = time_pair(ours, naive, module, x, repeats)
    ours_peak = peak_bytes(ours, module, x)
    naive_peak = peak_bytes(naive, module, x)
    return {
        "ours_ms": round(ours_ms, 1),
        "naive_ms": round(naive_ms, 1),
        "speedup": round(naive_ms / ours_ms, 2),
        "ours_peak_mb": round(ours_peak / 2**20, 1),
        "naive_peak_mb": round(naive_peak / 2**20, 1),
        "memory_ratio": round(naive_peak / ours_peak, 2),
    }


def run_shape(name: str, shape: dict[str, int], device: torch.device, repeats: int) -> dict[str, object]:
    """The whole CDTM (the headline figures), and the mixing step alone under ``mixing``."""
    torch.manual_seed(0)
    module = Cdtm(shape["C"], shape["N"], centres=shape["K"]).to(device)
    x = torch.randn(shape["B"], shape["N"], shape["C"], device=device)
    with torch.no_grad():
        max_diff = (ours_forward(module, x) - naive_forward(module, x)).abs().max().item()
    return {
        "shape": name,
        **shape,
        "L": 1,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        **compare(ours_forward, naive_forward, module, x, repeats),
        "expanded_tensor_mb": round(shape["B"] * shape["K"] * shape["N"] ** 2 * 4 / 2**20, 1),
        "max_abs_diff": max_diff,
        "mixing": compare(ours_mixing, naive_mixing, module, x, repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per shape")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per formulation (best reported)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared machine, other processes stall multi-threaded kernels)",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="only these shapes")
    args = parser.parse_args(argv)
    if args.repeats < 1:  # no timed run: the best would be infinite, and JSON has no Infinity
        parser.error(f"--repeats {args.repeats}: must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [run_shape(name, SHAPES[name], device, args.repeats) for name in (args.shape or SHAPES)]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"CDTM forward+backward, L=1, r=4 — {platform.processor() or platform.machine()}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'shape':<11} {'ours ms':>8} {'naive ms':>9} {'speedup':>8} {'ours MB':>8} {'naive MB':>9} {'mem ratio':>9}"
    print(header)
    for r in results:
        for label, row in ((r["shape"], r), ("  mixing", r["mixing"])):
            print(f"{label:<11} {row['ours_ms']:>8} {row['naive_ms']:>9} {row['speedup']:>8} "
                  f"{row['ours_peak_mb']:>8} {row['naive_peak_mb']:>9} {row['memory_ratio']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
