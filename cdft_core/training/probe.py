"""``cdft probe``: a linear-probe sweep on cached pooled features, every head trained at once.

Why: with the backbone frozen, linear probing is a few matrix products per step once the
pooled features are stored, and the right learning rate and weight decay are not known in
advance. One run trains a head per combination of ``--lrs`` and ``--weight-decays`` on the
same features with the functional core's vmapped heads
(:mod:`cdft_core.functional.vmap_heads`), chooses one by validation accuracy and leaves a
run directory that ``cdft eval`` reads like one of ``cdft run``.

The story, top to bottom (:func:`run_probe`):

1. Data, model and features: the ``linear`` strategy's model (``none`` adapter, frozen
   backbone), initialised as ``cdft run`` initialises it; the pooled features of the
   train, val and test images from the feature cache (:mod:`cdft_core.training.frozen`).
   Training images are seen as evaluation sees them (augmentation off: one view, exact),
   or with ``--train-views N`` as N stored augmented views (``--augment``'s pipeline), epoch
   *e* on view *e* mod N.
2. The sweep (:func:`sweep`): every head starts from the model's head; Adam exactly as
   ``torch.optim.Adam`` (L2 weight decay, per head), the recipe's schedule (warm-up, then
   cosine, per step), batches of ``batch_size`` in ``cdft run``'s order of the images
   (:func:`~cdft_core.training.loaders.train_order`): each head trains as it would alone.
   After each epoch every head's validation accuracy; a head keeps its best epoch's
   weights (``>=``: the later epoch wins, as in ``cdft run``).
3. Choice and evaluation: the head with the highest validation accuracy (ties: the first in
   grid order, learning rates outer, weight decays inner). Every head's kept weights are
   evaluated on val and test by :func:`~cdft_core.training.evaluation.evaluate` from the
   stored features (the numbers evaluating the images gives).
4. The run directory, as ``cdft run`` writes it: ``config.yaml`` (a run configuration:
   ``linear``, adapter ``none``, the chosen head's ``lr`` and ``weight_decay``),
   ``environment.json``, ``metrics.jsonl`` (per head: train loss and val accuracy per
   epoch, val and test metrics at its best epoch), ``train.log``,
   ``stage1-linear/best.safetensors`` (the whole model with the chosen head: ``cdft eval
   RUN`` gives its test metrics), ``best.json``, the confusion matrices and
   ``summary.json`` with every head under ``probe``. No TensorBoard files, no resume state.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import vmap

from cdft_core.config import RunConfig, absolute_paths, dump_yaml, resolve_device, resolve_precision
from cdft_core.errors import UsageError
from cdft_core.functional.pytree import unstack
from cdft_core.functional.vmap_heads import adam, heads_accuracy, init_heads, make_step
from cdft_core.training import metrics as metrics_lib
from cdft_core.training.distributed import DistInfo
from cdft_core.training.evaluation import eval_batch_size, evaluate
from cdft_core.training.loaders import steps_per_epoch, train_order
from cdft_core.training.log import RunLog
from cdft_core.training.schedule import lr_factor, seed_everything

STAGE_DIR = "stage1-linear"


@dataclass
class Sweep:
    """What :func:`sweep` returns, per head (``n`` = number of heads)."""

    params: dict[str, torch.Tensor]  # each head's weights at its best validation epoch, stacked (n, ...)
    best_accuracy: list[float]  # its best validation accuracy
    best_epoch: list[int]  # 1-based
    losses: list[list[float]]  # per epoch, each head's mean training loss
    accuracies: list[list[float]]  # per epoch, each head's validation accuracy


def grid(lrs: Sequence[float], weight_decays: Sequence[float]) -> list[tuple[float, float]]:
    """The heads' (lr, weight decay), learning rates outer: the order of ties and of every table."""
    return list(itertools.product(lrs, weight_decays))


def sweep(head: torch.nn.Linear, heads: Sequence[tuple[float, float]], train_x: torch.Tensor, train_y: torch.Tensor,
          val_x: torch.Tensor, val_y: torch.Tensor, *, epochs: int, batch_size: int, seed: int, views: int = 1,
          warmup_epochs: float = 0.0, warmup_start_factor: float = 1.0,
          max_steps_per_epoch: int | None = None) -> Sweep:
    """Train one copy of ``head`` per (lr, weight decay) at once, with per-head model selection.

    ``train_x`` holds ``views`` blocks of the N training images' features (row ``v·N + i``
    is view *v* of image *i*); epoch *e* reads block *e* mod ``views``. Each step's rate is
    ``lr × lr_factor(step)``, computed as ``cdft run`` computes it.
    """
    count = train_x.shape[0] // views
    lrs = [lr for lr, _ in heads]
    decays = torch.tensor([wd for _, wd in heads], dtype=train_x.dtype, device=train_x.device)
    params = init_heads(head, len(heads), seed=None)  # every head starts from this one's weights
    state = vmap(adam().init)(params)
    step = make_step(head, adam())
    steps = steps_per_epoch(count, 1, batch_size, max_steps_per_epoch)
    warmup, total = round(warmup_epochs * steps), epochs * steps
    best = {k: v.clone() for k, v in params.items()}
    result = Sweep(best, [-1.0] * len(heads), [0] * len(heads), [], [])
    for epoch in range(epochs):
        order = train_order(range(count), seed=seed, epoch=epoch, rank=0, world_size=1,
                            max_images=max_steps_per_epoch and max_steps_per_epoch * batch_size)
        offset = (epoch % views) * count
        sums = torch.zeros(len(heads), dtype=torch.float64)
        for index in range(steps):
            rows = torch.as_tensor(order[index * batch_size:(index + 1) * batch_size], device=train_x.device)
            factor = lr_factor(epoch * steps + index, warmup, total, warmup_start_factor)
            rates = torch.tensor([lr * factor for lr in lrs], dtype=train_x.dtype, device=train_x.device)
            params, state, losses = step(params, state, rates, train_x[rows + offset], train_y[rows], decays)
            sums += losses.detach().double().cpu() * len(rows)
        accuracy = heads_accuracy(head, params, val_x, val_y).tolist()
        result.losses.append((sums / min(len(order), steps * batch_size)).tolist())
        result.accuracies.append(accuracy)
        for h, value in enumerate(accuracy):
            if value >= result.best_accuracy[h]:
                result.best_accuracy[h], result.best_epoch[h] = value, epoch + 1
                for name, tensor in params.items():
                    result.params[name][h] = tensor[h]
    return result


def chosen_head(best_accuracy: Sequence[float]) -> int:
    """The head with the highest validation accuracy; the first of equals."""
    return max(range(len(best_accuracy)), key=lambda h: (best_accuracy[h], -h))


# -- the command's work -------------------------------------------------------------------
def run_probe(config: RunConfig, lrs: Sequence[float], weight_decays: Sequence[float],
              argv: list[str] | None = None) -> dict[str, Any]:
    """The whole probe (see the module docstring); returns the summary it writes."""
    from cdft_core.data.image_cache import cache_for_tables, tables_key
    from cdft_core.data.images import ImageDataset
    from cdft_core.data.transforms import eval_transform, train_transform
    from cdft_core.models.model import build_model
    from cdft_core.models.weights import weights_origin
    from cdft_core.strategy import apply_stage, check_compatible
    from cdft_core.training.frozen import FeatureSource, eval_features, view_features
    from cdft_core.training.loaders import SeededAugmentation
    from cdft_core.training.preflight import load_run_splits, preflight
    from cdft_core.training.rundir import auto_name, create_run_dir, write_run_split

    started = time.time()
    check_grid(lrs, weight_decays)
    heads = grid(lrs, weight_decays)
    config = dataclasses.replace(absolute_paths(config), strategy="linear", strategy_options={}, adapter="none",
                                 adapter_options={}, optimizer="adam", lr=heads[0][0], weight_decay=heads[0][1],
                                 feature_cache=True)
    strategy, _ = preflight(config)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    log = RunLog(True)
    splits = load_run_splits(config)
    config = dataclasses.replace(config, dataset_options=dict(splits.options))
    seed_everything(config.seed)  # the head `cdft run --strategy linear` would start from
    model = build_model(config.backbone, "none", len(splits.classes), pretrained=config.pretrained,
                        weights=config.weights, image_size=config.image_size).to(dist.device)
    check_compatible(strategy, model)
    apply_stage(model, strategy.stages[0])
    tables = [splits.train, splits.val, splits.test]
    cache = cache_for_tables(splits.root, tables, model.data_config, cache_dir=config.cache_dir, progress=True,
                             log=log) if config.cache else None
    rundir = create_run_dir(config.output, config.runs_dir, auto_name(config.dataset, config.backbone, "probe",
                                                                      config.val_fold, config.test_fold, config.seed))
    write_run_split(rundir, splits)  # the rows `cdft eval` of this run evaluates, whatever becomes of the split file
    log(f"probe {rundir.url}: {config.dataset} ({len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test images, {len(splits.classes)} classes), {config.backbone}, {len(heads)} linear "
        f"heads ({len(lrs)} learning rates x {len(weight_decays)} weight decays) on {device}, {precision}")
    log(f"backbone weights: {weights_origin(model.backbone)}")
    source = FeatureSource.of(model, "none", images_key=cache.key if cache is not None else tables_key(
        splits.root, tables, model.data_config), root=splits.root, precision=precision, dist=dist,
        cache_dir=config.cache_dir, log=log)
    batch, workers = eval_batch_size(config), config.num_workers
    evaluation = {name: ImageDataset(splits.root, getattr(splits, name), eval_transform(model.data_config), cache)
                  for name in ("train", "val", "test")}
    stored = {name: eval_features(source, name, evaluation[name], getattr(splits, name)["image_path"].tolist(),
                                  batch, workers) for name in ("val", "test")}
    views_used = config.train_views if config.augment != "none" else None  # no augmentation: the plain features
    if views_used:
        augmented = SeededAugmentation(ImageDataset(splits.root, splits.train,
                                                    train_transform(model.data_config, config.augment), cache),
                                       config.seed)
        views = view_features(source, augmented, splits.train["image_path"].tolist(), views=views_used,
                              seed=config.seed, batch_size=batch, num_workers=workers, augment=config.augment)
        train_store, train_y = views.store, views.labels
    else:
        plain = eval_features(source, "train", evaluation["train"], splits.train["image_path"].tolist(), batch, workers)
        train_store, train_y = plain.store, plain.labels
    train_x = train_store.take(slice(None)).pooled.float().to(dist.device)
    val_x = stored["val"].store.take(slice(None)).pooled.float().to(dist.device)

    start = time.time()
    result = sweep(model.head, heads, train_x, train_y.to(dist.device), val_x, stored["val"].labels.to(dist.device),
                   epochs=config.epochs, batch_size=config.batch_size, seed=config.seed,
                   views=views_used or 1, warmup_epochs=config.warmup_epochs,
                   warmup_start_factor=config.warmup_start_factor, max_steps_per_epoch=config.max_steps_per_epoch)
    log(f"{len(heads)} heads x {config.epochs} epochs trained in {time.time() - start:.1f} s")

    table = []
    for h, weights in enumerate(unstack(result.params)):
        model.head.load_state_dict(weights)
        row = {"head": h + 1, "lr": heads[h][0], "weight_decay": heads[h][1], "best_epoch": result.best_epoch[h]}
        for name in ("val", "test"):
            row[name] = evaluate(model, evaluation[name], splits.classes, dist, batch, workers, precision,
                                 description=f"head {h + 1} {name}", loader=stored[name], groups=splits.groups(name))
        table.append(row)
    choice = chosen_head(result.best_accuracy)
    for store in [train_store, *(s.store for s in stored.values())]:
        store.close()
    model.head.load_state_dict(unstack(result.params)[choice])
    probe = {"lrs": list(lrs), "weight_decays": list(weight_decays), "chosen": choice + 1,
             "selected_by": "validation accuracy of the vmapped heads (fp32)", "heads": table}
    return _write(rundir, config, model, splits, probe, result, log, argv, precision, started)


def check_grid(lrs: Sequence[float], weight_decays: Sequence[float]) -> None:
    """Learning rates positive, weight decays not negative, at least one of each."""
    if not lrs or not weight_decays:
        raise UsageError("--lrs and --weight-decays each need at least one value")
    bad = [v for v in lrs if not v > 0 or v == float("inf")]
    if bad:
        raise UsageError(f"--lrs must be positive finite numbers, got {bad[0]!r}")
    bad = [v for v in weight_decays if not 0 <= v < float("inf")]
    if bad:
        reason = "must not be negative" if bad[0] < 0 else "must be finite numbers"  # nan and inf: not "negative"
        raise UsageError(f"--weight-decays {reason}, got {bad[0]!r}")


def _write(rundir: Any, config: RunConfig, model: Any, splits: Any, probe: dict[str, Any], result: Sweep,
           log: RunLog, argv: list[str] | None, precision: str, started: float) -> dict[str, Any]:
    """The run directory's files (the model holds the chosen head); returns the summary."""
    from cdft_core.training.checkpoint import save_model
    from cdft_core.training.rundir import environment_info, run_plugins

    table, choice = probe["heads"], probe["chosen"] - 1
    heads = [(row["lr"], row["weight_decay"]) for row in table]
    lr, weight_decay = heads[choice]
    # what the head was trained on: without --train-views the plain features, i.e. `--augment
    # none`, so `cdft run --config RUN/config.yaml` repeats it and reports group it rightly
    augment = config.augment if config.train_views else "none"
    config = dataclasses.replace(config, lr=lr, weight_decay=weight_decay, augment=augment)
    chosen = table[choice]
    rundir.write_text("config.yaml", dump_yaml(config))
    plugins = run_plugins(config, model.spec)
    rundir.write_text("environment.json", json.dumps(environment_info(list(argv or sys.argv), 1, plugins), indent=2))
    lines = []
    for epoch, (losses, accuracies) in enumerate(zip(result.losses, result.accuracies, strict=True), start=1):
        for h, (head_lr, head_wd) in enumerate(heads):
            common = {"stage": "linear", "stage_index": 1, "epoch": epoch, "head": h + 1, "lr": head_lr,
                      "weight_decay": head_wd}
            lines += [{**common, "split": "train", "loss": losses[h]},
                      {**common, "split": "val", "accuracy": accuracies[h]}]
    for h, row in enumerate(table):
        for name in ("val", "test"):
            lines.append({"stage": "linear", "stage_index": 1, "epoch": row["best_epoch"], "head": h + 1,
                          "lr": row["lr"], "weight_decay": row["weight_decay"], "split": name, **row[name]})
    rundir.write_text("metrics.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    save_model(rundir, f"{STAGE_DIR}/best.safetensors", model.state_dict(), {
        "cdft_spec": model.spec, "cdft_config": config.to_dict(), "cdft_classes": splits.classes,
        "cdft_plugins": plugins, "cdft_stage": "linear", "cdft_stage_index": 1, "cdft_epoch": chosen["best_epoch"],
        "cdft_probe": {"head": choice + 1, "lr": lr, "weight_decay": weight_decay},
    })
    best = {"stage": "linear", "epoch": chosen["best_epoch"], "val": chosen["val"], "test": chosen["test"]}
    rundir.write_text(f"{STAGE_DIR}/best.json", json.dumps(best, indent=2))
    matrix = metrics_lib.confusion_csv(chosen["test"]["confusion_matrix"], splits.classes)
    rundir.write_text(f"{STAGE_DIR}/confusion_matrix.csv", matrix)
    rundir.write_text("confusion_matrix.csv", matrix)
    checkpoint = f"{STAGE_DIR}/best.safetensors"
    summary = {
        "status": "complete", "kind": "probe", "run_dir": rundir.url, "dataset": config.dataset,
        "protocol": splits.protocol, "backbone": config.backbone, "adapter": "none", "strategy": "linear",
        "seed": config.seed, "classes": splits.classes,
        "images": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "world_size": 1, "precision": precision, "train_views": config.train_views,
        "best_stage": "linear", "best_epoch": chosen["best_epoch"], "val": chosen["val"], "test": chosen["test"],
        "checkpoint": checkpoint,
        "stages": [{"index": 1, "name": "linear", "epochs": config.epochs, "lr": lr, "init": "start",
                    "best_epoch": chosen["best_epoch"], "val": chosen["val"], "test": chosen["test"],
                    "checkpoint": checkpoint}],
        "probe": probe, "elapsed_s": round(time.time() - started, 1),
    }
    log(f"done in {summary['elapsed_s']:.0f} s: head {choice + 1} (lr {lr:g}, weight decay {weight_decay:g}) chosen "
        f"by validation accuracy {chosen['val']['accuracy']:.4f}; test accuracy {chosen['test']['accuracy']:.4f}; "
        f"checkpoint {rundir.join(checkpoint)}")
    rundir.write_text("train.log", log.text())
    rundir.write_text("summary.json", json.dumps(summary, indent=2))
    return summary
