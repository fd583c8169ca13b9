"""Peak memory and images/s of fine-tuning the pathology foundation models: full, full with
gradient checkpointing, and LoRA, in bf16, at batch 8 and 32.

The rows are cdft's curated backbones with random weights (the architecture is what costs;
nothing is downloaded): ``uni`` (ViT-L/16, layer scale) and ``virchow2`` (ViT-H/14,
SwiGLU, 4 register tokens), at their 224 px input, each with a linear head (``--adapter
none``). The model, the LoRA injection (``Strategy.change_model``), the labels and the
optimizer come from cdft itself, as ``cdft run`` builds them; one step is the engine's
(autocast forward, fp32 cross-entropy, backward, fused Adam on CUDA, ``loss.item()``), on a
synthetic batch already on the device.

- ``mode``: ``full`` (every parameter trains), ``full+gc`` (the same with
  ``--grad-checkpointing``), ``lora`` (``--strategy lora``: rank 8 in every linear layer of
  the backbone, plus the head; the base weights frozen).
- ``img_s``: images per second over ``--steps`` timed steps after ``--warmup`` steps.
- ``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` for the row (model, optimizer
  state, activations); ``oom`` when the row does not fit.
- ``trainable``: parameters the optimizer updates.

    python benchmarks/foundation_finetune.py --device cuda            # the table (H100/H200)
    python benchmarks/foundation_finetune.py --device cuda --json
    python benchmarks/foundation_finetune.py                          # CPU: the plumbing, on test_vit
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import NUM_CLASSES, positive_ints, synchronize, train_step  # noqa: E402  (the engine's step, shared)

#: UNI-sized and Virchow2-sized rows (cdft's curated foundation backbones)
BACKBONES = {"vit_l": "uni", "vit_h": "virchow2"}
MODES = ("full", "full+gc", "lora")


def build(backbone: str, mode: str, image_size: int | None, device: torch.device) -> tuple[Any, Any]:
    """A cdft model (linear head) labelled for the mode's strategy, and its optimizer."""
    from cdft_core.config import RunConfig
    from cdft_core.models.model import build_model
    from cdft_core.models.model_change import change_model
    from cdft_core.strategy import apply_stage, build_strategy
    from cdft_core.training.optimizer import build_optimizer

    name = "lora" if mode == "lora" else "full"
    strategy = build_strategy(name)
    torch.manual_seed(0)
    model = build_model(backbone, "none", NUM_CLASSES, pretrained=False, image_size=image_size,
                        grad_checkpointing=mode == "full+gc")
    change_model(model, strategy, name, {})
    model.to(device)
    stage = strategy.stages[0]
    labels = apply_stage(model, stage)
    config = RunConfig(device=device.type)
    optimizer = build_optimizer(model, labels, stage, config)
    return model, optimizer


def measure(name: str, mode: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    backbone = BACKBONES.get(name, name)
    row: dict[str, Any] = {"backbone": name, "cdft": backbone, "mode": mode, "batch": batch, "precision": args.precision}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, optimizer = build(backbone, mode, args.image_size, device)
        size = int(model.spec["image_size"])
        images = torch.randn(batch, 3, size, size, device=device)
        labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
        row.update(image_size=size, trainable=sum(p.numel() for g in optimizer.param_groups for p in g["params"]))
        model.train()
        for _ in range(args.warmup):
            train_step(model, optimizer, images, labels, args.precision)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(model, optimizer, images, labels, args.precision)
        synchronize(device)
        row["img_s"] = round(batch * args.steps / (time.perf_counter() - start), 1)
        if device.type == "cuda":
            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except torch.OutOfMemoryError:
        row.update(img_s=None, peak_mem_gb="oom")
    finally:
        model = optimizer = images = None  # noqa: F841  (free before the next row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backbones", default=None, help="comma-separated (default: vit_l,vit_h on CUDA, test_vit on CPU)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--batches", default=None, help="default: 8,32 on CUDA, 2,4 on CPU")
    parser.add_argument("--precision", default=None, choices=("bf16", "fp32"),
                        help="default: bf16 on CUDA, fp32 on CPU (the engine's step has no fp16 grad scaler)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's (CPU: 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    device = torch.device(args.device)
    names = (args.backbones or ("vit_l,vit_h" if cuda else "test_vit")).split(",")
    batches = positive_ints(parser, "--batches", args.batches or ("8,32" if cuda else "2,4"))
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:  # an unknown mode would otherwise be measured as full
        parser.error(f"--modes: {', '.join(map(repr, unknown))} is not one of {', '.join(MODES)}")
    for option, value, least in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                                 ("--image-size", args.image_size, 1)):
        if value is not None and value < least:
            parser.error(f"--{option[2:]} {value}: must be at least {least}")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.steps = args.steps if args.steps is not None else (10 if cuda else 2)
    if not cuda and args.image_size is None:
        args.image_size = 32
    if cuda:
        from cdft_core.training.speed import configure_backends

        configure_backends(device)
    if "lora" in modes:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("foundation_finetune: peft is not installed (pip install 'cdft[lora]'): the lora rows are skipped",
                  file=sys.stderr)
            modes.remove("lora")
    rows = [measure(name, mode, batch, args, device) for name in names for mode in modes for batch in batches]
    machine = {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.json:
        print(json.dumps({"machine": machine, "rows": rows}, indent=1))
        return 0
    columns = ("backbone", "mode", "batch", "image_size", "trainable", "img_s", "peak_mem_gb")
    print(f"# {machine['device']}, torch {machine['torch']}, {args.precision}, {machine['date']}")
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
