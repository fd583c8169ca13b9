"""Training-step throughput and model FLOP utilisation per strategy, for the paper's ViT-B/16
and ConvNeXt-B, eager and compiled.

One step as ``cdft run`` takes it (``cdft_core.training.engine.train_epoch``): autocast
forward, cross-entropy in fp32, ``zero_grad``, backward, optimizer step and ``loss.item()``
(the engine reads every loss), on a synthetic batch already on the device, so the figure is
the step and not the loader. The model, strategy labels and optimizer come from cdft itself
(``build_model``, ``apply_stage``, ``build_optimizer``) with the engine's GPU-step settings
(``cdft_core.training.speed``): channels_last for ConvNeXt and fused Adam on CUDA, cuDNN
autotuning, and for compiled rows the same in-place ``torch.compile`` as ``--compile``.
Random weights (the architecture is what costs; nothing is downloaded).

- ``img_s``: images per second over ``--steps`` timed steps after ``--warmup`` steps
  (compilation and cuDNN autotuning happen in the warm-up; ``warmup_s`` is its time).
- ``gflop_img``: matrix-product, convolution and attention FLOPs of one image's forward +
  backward (``torch.utils.flop_counter.FlopCounterMode``, attention counted through its
  math form; elementwise work is not counted, as usual for MFU). ``linear`` does no backbone
  backward, so it has about a third of ``full``'s FLOPs.
- ``tflop_s`` = gflop_img × img_s; ``mfu`` = tflop_s ÷ the device's dense bf16 peak
  (:data:`PEAK_BF16_TFLOPS`; ``--peak-tflops`` for another card). CPU: no utilisation.
- ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` over the config (CUDA).
- ``mode``: ``eager``, or the ``--compile-mode`` of a compiled row (``--compile-modes``:
  ``default``, ``max-autotune`` (autotuned matrix products and CUDA graphs),
  ``max-autotune-no-cudagraphs``, ``reduce-overhead`` (CUDA graphs alone)).
- ``attention``: the scaled-dot-product-attention kernel the step runs (flash, efficient,
  cudnn, math, flash-cpu), read from the aten operators of one eager forward; empty for a
  model without attention.

    python benchmarks/train_step.py                    # CPU: reduced sizes (64 px, batch 4), eager
    python benchmarks/train_step.py --device cuda      # bf16, batch 128 and 256, eager and compiled
    python benchmarks/train_step.py --device cuda --json --time-budget 400
    python benchmarks/train_step.py --device cuda --backbones vit_b16 --strategies full --compile on \
        --compile-modes default,max-autotune-no-cudagraphs,max-autotune --batch-sizes 256,128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

#: the paper's backbones (docs/method.md#backbones), random init: the LAION-2B CLIP rows
BACKBONES = {"vit_b16": "vit_base_patch16_clip_224.laion2b", "convnext_b": "convnext_base.clip_laion2b_augreg"}
STRATEGIES = ("linear", "frt", "full")
NUM_CLASSES = 8  # BreakHis subtypes

#: dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets;
#: matched against ``torch.cuda.get_device_name`` in order (GH200 before H200)
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], str, float], ...] = (
    (("GH200",), "GH200", 989.4),
    (("H200", "NVL"), "H200 NVL", 835.0),
    (("H200",), "H200 SXM", 989.4),
    (("H100", "PCIE"), "H100 PCIe", 756.0),
    (("H100", "NVL"), "H100 NVL", 835.0),
    (("H100",), "H100 SXM", 989.4),
    (("A100",), "A100", 312.0),
)


def peak_bf16(device_name: str) -> tuple[str, float] | None:
    """(card, dense bf16 TFLOP/s) for a CUDA device name, or None when the card is not in the table."""
    upper = device_name.upper()
    for words, card, tflops in PEAK_BF16_TFLOPS:
        if all(word in upper for word in words):
            return card, tflops
    return None


def build(backbone: str, strategy_name: str, image_size: int | None, device: torch.device) -> tuple[Any, Any]:
    """A cdft model labelled for the strategy's (first) stage and its optimizer, as the engine builds them."""
    from cdft_core.config import RunConfig
    from cdft_core.models.model import build_model
    from cdft_core.strategy import apply_stage, build_strategy
    from cdft_core.training.optimizer import build_optimizer
    from cdft_core.training.speed import use_channels_last

    strategy = build_strategy(strategy_name)
    torch.manual_seed(0)
    model = build_model(backbone, strategy.default_adapter, NUM_CLASSES, pretrained=False, image_size=image_size)
    model.to(device)
    if use_channels_last(model.backbone, device):
        model.to(memory_format=torch.channels_last)
    stage = strategy.stages[0]
    labels = apply_stage(model, stage)
    optimizer = build_optimizer(model, labels, stage, RunConfig())
    return model, optimizer


def conv_backward_flop(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any, _padding: Any,
                       _dilation: Any, transposed: bool, _output_padding: Any, _groups: Any, output_mask: Any,
                       out_shape: Any = None) -> int:
    """A convolution's backward: one forward's FLOPs for each gradient asked for (input, weight).

    torch's own formula counts the weight gradient of a grouped convolution as if it were
    dense: ConvNeXt's depthwise 7×7 backward came out at 160× its forward.
    """
    per_pass = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return per_pass * (int(output_mask[0]) + int(output_mask[1]))


def flops_per_image(model: Any, images: torch.Tensor, labels: torch.Tensor, precision: str) -> float:
    """Forward + backward FLOPs of one image (a batch of 2, attention through its math form)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from cdft_core.training.evaluation import autocast

    model.train()
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop})
    with sdpa_kernel(SDPBackend.MATH), counter:
        with autocast(precision, images.device):
            logits = model(images[:2])
        F.cross_entropy(logits.float(), labels[:2]).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


#: the aten operators behind ``F.scaled_dot_product_attention``, by the kernel they run
ATTENTION_OPS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention": "efficient",
                 "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_attention_math": "math",
                 "_scaled_dot_product_flash_attention_for_cpu": "flash-cpu"}


def attention_kernels(model: Any, images: torch.Tensor, precision: str) -> str:
    """The attention kernels one eager forward of ``model`` runs (``flash``...), comma-separated.

    Read from the aten operators dispatched, so it names what SDPA chose on this device,
    dtype and shape, not what its switches allow; a model that computes attention by hand
    (no SDPA) shows nothing.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from cdft_core.training.evaluation import autocast

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.kernels: dict[str, None] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
            kernel = ATTENTION_OPS.get(func.overloadpacket.__name__)
            if kernel:
                self.kernels[kernel] = None
            return func(*args, **(kwargs or {}))

    seen = Seen()
    with torch.no_grad(), autocast(precision, images.device), seen:
        model(images[:2])
    return ",".join(seen.kernels)


def train_step(model: Any, optimizer: Any, images: torch.Tensor, labels: torch.Tensor, precision: str) -> float:
    """One step exactly as the engine's (bf16/fp32; no grad scaler)."""
    from cdft_core.training.evaluation import autocast

    with autocast(precision, images.device):
        logits = model(images)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, strategy: str, batch: int, mode: str, args: argparse.Namespace,
            device: torch.device, peak: tuple[str, float] | None) -> dict[str, Any]:
    """One row: build, count FLOPs, warm up (compile unless ``mode`` is eager), time ``args.steps`` steps."""
    from cdft_core.training.speed import compile_model, to_device, use_channels_last

    backbone = BACKBONES.get(name, name)
    compiled = mode != "eager"
    row: dict[str, Any] = {"backbone": name, "timm": backbone, "strategy": strategy, "batch": batch,
                           "mode": mode, "precision": args.precision}
    model, optimizer = build(backbone, strategy, args.image_size, device)
    size = int(model.spec["image_size"])
    channels_last = use_channels_last(model.backbone, device)
    images = to_device(torch.randn(batch, 3, size, size), device, channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    row.update(image_size=size, channels_last=channels_last,
               trainable=sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
               optimizer="fused" if optimizer.param_groups[0].get("fused") else
               "foreach" if optimizer.param_groups[0].get("foreach") else "default")
    gflop = flops_per_image(model, images, labels, args.precision) / 1e9
    row["attention"] = attention_kernels(model, images, args.precision)
    if compiled:
        compile_model(model, mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    start = time.perf_counter()
    for _ in range(args.warmup):
        train_step(model, optimizer, images, labels, args.precision)
    synchronize(device)
    row["warmup_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, optimizer, images, labels, args.precision)
    synchronize(device)
    seconds = time.perf_counter() - start
    img_s = batch * args.steps / seconds
    tflop_s = gflop * img_s / 1e3
    row.update(step_ms=round(1e3 * seconds / args.steps, 2), img_s=round(img_s, 1), gflop_img=round(gflop, 2),
               tflop_s=round(tflop_s, 3 if device.type == "cpu" else 1),
               mfu=round(100 * tflop_s / peak[1], 1) if peak else None)
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
    del model, optimizer, images, labels
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()  # each compiled row pays (and reports) its own compilation
    return row


def machine(device: torch.device, peak: tuple[str, float] | None) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device.type,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), peak_card=peak[0] if peak else None,
                    peak_bf16_tflops=peak[1] if peak else None)
    return info


def table(rows: list[dict[str, Any]]) -> str:
    cols = ("backbone", "strategy", "batch", "mode", "image_size", "img_s", "step_ms", "gflop_img", "tflop_s",
            "mfu", "peak_mem_gb", "warmup_s", "attention")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['backbone']} | {row['strategy']} | {row['batch']} | {row['mode']} | "
                         f"error: {row['error']}")
        else:
            lines.append(" | ".join("" if row.get(c) is None else str(row[c]) for c in cols))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="vit_b16, convnext_b or cdft backbone names")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--batch-sizes", default=None, help="default: 128,256 on CUDA, 4 on CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's on CUDA, 64 on CPU")
    parser.add_argument("--precision", default=None, choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--compile", default=None, choices=("off", "on", "both"), help="default: both on CUDA, off on CPU")
    parser.add_argument("--compile-modes", default="default",
                        help="torch.compile modes of the compiled rows, comma-separated (cdft run --compile-mode)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; rows not started by then are skipped (eager rows run first)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu (or auto)")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if cuda else "cpu"
    args.batch_sizes = positive_ints(parser, "--batch-sizes", args.batch_sizes or ("128,256" if cuda else "4"))
    for option, value, least in (("--image-size", args.image_size, 1), ("--steps", args.steps, 1),
                                 ("--warmup", args.warmup, 0), ("--time-budget", args.time_budget, 1e-9),
                                 ("--peak-tflops", args.peak_tflops, 1e-9), ("--threads", args.threads, 1)):
        if value is not None and value < least:  # 0 must not silently mean "the default"
            parser.error(f"{option} {value}: must be {'at least 0' if least == 0 else 'greater than 0'}")
    args.image_size = args.image_size if args.image_size is not None else (None if cuda else 64)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.compile = args.compile or ("both" if cuda else "off")
    from cdft_core.config import COMPILE_MODES

    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    unknown = [m for m in args.compile_modes if m not in COMPILE_MODES]
    if unknown or not args.compile_modes:
        parser.error(f"--compile-modes: {', '.join(unknown) or 'none given'}; choose from {', '.join(COMPILE_MODES)}")
    args.steps = args.steps if args.steps is not None else (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    return args


def positive_ints(parser: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """``"128,256"`` as ints, each at least 1; anything else is a usage error naming the option."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        parser.error(f"{option} {text!r}: give whole numbers greater than 0, comma-separated (e.g. 128,256)")
    return values


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")  # as the engine
    from cdft_core.training.speed import configure_backends

    configure_backends(device)
    peak = None
    if device.type == "cuda":
        peak = ("given", args.peak_tflops) if args.peak_tflops is not None else peak_bf16(torch.cuda.get_device_name(device))
    groups = {"off": [["eager"]], "on": [args.compile_modes], "both": [["eager"], args.compile_modes]}[args.compile]
    # eager rows first, then compiled ones (each pays a compilation); in the order of the options,
    # batch sizes outermost, then modes, so a --time-budget cuts the least wanted rows (the last ones)
    plan = [(name, strategy, batch, mode) for modes in groups for batch in args.batch_sizes for mode in modes
            for strategy in args.strategies.split(",") for name in args.backbones.split(",")]
    started, rows = time.perf_counter(), []
    for name, strategy, batch, mode in plan:
        if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
            rows.append({"backbone": name, "strategy": strategy, "batch": batch, "mode": mode,
                         "error": "skipped: --time-budget spent"})
            continue
        try:
            row = measure(name, strategy, batch, mode, args, device, peak)
        except Exception as exc:  # one failing row (out of memory, a compile error) must not hide the others
            row = {"backbone": name, "strategy": strategy, "batch": batch, "mode": mode,
                   "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress, and what survives a kill
    result = {"machine": machine(device, peak), "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(json.dumps(result["machine"]))
        print(table(rows))
    if all("error" in row for row in rows):  # nothing was measured: a script or smoke step must see a failure
        print(f"train_step: every row failed ({len(rows)}); see each row's error", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
