"""Frozen stages with and without the feature cache: time of an epoch after the first, and of
the validation + test evaluation alone.

Runs ``cdft run`` in-process (the engine itself, not a model of it) on synthetic
BreakHis-layout data with a ViT-S/16-sized backbone (``vit_small_patch16_224``, random
weights, nothing downloaded) at 224 px, for ``linear`` (the ``none`` adapter: pooled
features) and ``frt`` (the CDTM: tokens), each twice:

- ``uncached``: ``--no-feature-cache``: every epoch runs the backbone on the augmented
  training images and on the validation images;
- ``cached``: the default feature cache plus ``--train-views 4``: the validation and test
  features and 4 augmented views of the training images are computed once when the stage
  starts (``build_s``), and every epoch reads them.

Both use the image cache, so the difference is the backbone's work. ``epoch_s`` is one
epoch (training plus its validation), the fastest of epochs 2.. (on a shared machine a
busy moment slows one epoch, not the figure); ``eval_s`` the validation (fastest of those
epochs) plus the test evaluation. Speed-ups are uncached / cached.

    python benchmarks/frozen.py                 # a table
    python benchmarks/frozen.py --json          # a JSON object
    python benchmarks/frozen.py --images 6 --epochs 3 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

BACKBONE = "vit_small_patch16_224"


@contextlib.contextmanager
def timed_engine(times: dict[str, list[float]]) -> Iterator[None]:
    """Record the duration of every training epoch, evaluation and stage-feature build of a run.

    Patched where the engine looks each one up: ``train_epoch`` and ``evaluate_split`` (each
    epoch's validation) in the engine's namespace, ``predict`` in ``predictions`` (called by
    ``best_predictions`` once per split on the best weights: the ``test`` pass is the test
    evaluation; its repeated ``val`` pass only feeds ``predictions.csv`` and is kept apart),
    and ``stage_features``, which ``train_stage`` imports from ``frozen`` at each call.
    """
    from cdft_core.training import engine, frozen, predictions

    originals = engine.train_epoch, engine.evaluate_split, predictions.predict, frozen.stage_features

    def wrap(name: str, function: Any, key: Any = None) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.setdefault(key(*args, **kwargs) if key else name, []).append(time.perf_counter() - start)
        return timed

    def split_key(*args: Any, **kwargs: Any) -> str:  # predict(..., description="stage 1/1 test")
        return "test" if kwargs["description"].endswith(" test") else "best_val"

    engine.train_epoch = wrap("train", originals[0])
    engine.evaluate_split = wrap("val", originals[1])
    predictions.predict = wrap("test", originals[2], key=split_key)
    frozen.stage_features = wrap("build", originals[3])
    try:
        yield
    finally:
        engine.train_epoch, engine.evaluate_split, predictions.predict, frozen.stage_features = originals


def one_run(data: tuple[str, str], strategy: str, cached: bool, args: argparse.Namespace, out: str) -> dict[str, Any]:
    from cdft_core.config import RunConfig
    from cdft_core.training import engine

    root, split = data
    config = RunConfig(dataset="breakhis", data_root=root, split_file=split, val_fold=1, test_fold=3,
                       backbone=BACKBONE, pretrained=False, image_size=224, strategy=strategy, epochs=args.epochs,
                       batch_size=args.batch_size, num_workers=args.workers, device=args.device, log_every=1000,
                       tensorboard=False, feature_cache=cached, train_views=args.views if cached else None,
                       output=os.path.join(out, f"{strategy}-{'cached' if cached else 'uncached'}"))
    times: dict[str, list[float]] = {}
    with open(os.devnull, "w") as sink, timed_engine(times), contextlib.redirect_stderr(sink):
        summary = engine.main(config)
    later = range(1, args.epochs)  # epochs 2..
    epoch_s = min(times["train"][e] + times["val"][e] for e in later)
    eval_s = min(times["val"][e] for e in later) + times["test"][0]
    return {"strategy": strategy, "feature_cache": cached, "train_views": config.train_views,
            "epoch_s": round(epoch_s, 4), "eval_s": round(eval_s, 4), "build_s": round(sum(times.get("build", [0])), 2),
            "test_accuracy": summary["test"]["accuracy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument("--images", type=int, default=3, help="synthetic images per patient and magnification "
                        "(3: 24 train, 9 val, 9 test images; the real BreakHis 200X task has about 30x more)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (epochs 2.. are timed)")
    parser.add_argument("--views", type=int, default=4, help="--train-views of the cached runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0", help="--num-workers (0: load in the training process)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--strategy", action="append", choices=["linear", "frt"], help="only these (default both)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epochs after the first are timed)")
    torch.set_num_threads(args.threads)
    from cdft_core.data.splits import prepare
    from cdft_core.data.synthetic import make_synthetic_breakhis
    from cdft_core.data.tables import write_split_file

    with tempfile.TemporaryDirectory(prefix="cdft-frozen-") as folder:
        os.environ["CDFT_CACHE_DIR"] = os.path.join(folder, "cache")  # a fresh cache: every build is timed
        root = make_synthetic_breakhis(folder, seed=0, images_per_magnification=args.images, size=(350, 230))
        split = os.path.join(folder, "splits.csv")
        write_split_file(prepare("breakhis", root, seed=1), split)
        rows = []
        for strategy in args.strategy or ["linear", "frt"]:
            plain, cached = (one_run((root, split), strategy, flag, args, folder) for flag in (False, True))
            rows += [plain, cached]
            cached["epoch_speedup"] = round(plain["epoch_s"] / cached["epoch_s"], 1)
            cached["eval_speedup"] = round(plain["eval_s"] / cached["eval_s"], 1)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                         f"{torch.__version__}, {args.threads} threads, device {args.device}",
              "backbone": BACKBONE, "image_size": 224, "images_per_magnification": args.images,
              "epochs": args.epochs, "batch_size": args.batch_size, "runs": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{BACKBONE} at 224 px, {result['machine']}")
    print(f"{'strategy':8} {'cache':9} {'epoch s':>9} {'eval s':>8} {'build s':>8} {'epoch x':>8} {'eval x':>7}")
    for row in rows:
        print(f"{row['strategy']:8} {'views ' + str(row['train_views']) if row['feature_cache'] else 'off':9} "
              f"{row['epoch_s']:9.3f} {row['eval_s']:8.3f} {row['build_s']:8.1f} "
              f"{row.get('epoch_speedup', ''):>8} {row.get('eval_speedup', ''):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
