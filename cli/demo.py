"""``cdft demo``: the whole pipeline on a fresh machine, on CPU, timed.

It writes a small synthetic BreakHis-format dataset, builds its patient-level split
file the way ``cdft prepare`` does (and prints the warnings ``cdft prepare`` would), and
runs a ``staged`` fine-tune (stage 1: frozen backbone + CDTM adapter + head; stage 2:
everything, from stage 1's best weights at a tenth of the learning rate) of timm's tiny
``test_vit`` with random weights — then prints the result table, the TensorBoard command
and the time it took, measured. The images are synthetic and the weights random: the
demo shows that the machinery works, not how well a real backbone does.

Everything goes to a working directory outside the source tree: ``--output DIR``, by
default ``$XDG_CACHE_HOME/cdft/demo`` (``~/.cache/cdft/demo``). The data and split file
there are reused by later demos; each demo adds a run under ``runs/``.
"""

from __future__ import annotations

import os
import time

import click

DEMO_BACKBONE = "test_vit"
DEMO_OPTIONS = {"task": "malignant-subtype", "magnification": "all"}  # the paper's task, every magnification
# five patients per tumour type and five folds: every fold holds patients of every class
DEMO_DATA = {"patients_per_type": 5, "images_per_magnification": 2}


def default_output() -> str:
    """The demo's working directory when ``--output`` is not given: ``demo/`` in cdft's
    cache dir (the one the image cache uses), never the current directory."""
    from cdft_core.data.cache_dir import default_cache_dir

    return os.path.join(default_cache_dir(), "demo")


@click.command("demo")
@click.option("--output", "-o", default=None, metavar="DIR",
              help="Working directory for the synthetic data, split file and runs/ (reused by later demos) "
                   "[default: demo/ in cdft's cache dir: $CDFT_CACHE_DIR, else ~/.cache/cdft].")
@click.option("--epochs", type=int, default=5, show_default=True, help="Epochs per stage.")
@click.option("--image-size", type=int, default=64, show_default=True, help="Input size of the tiny ViT.")
@click.option("--num-workers", default="0", show_default=True, metavar="N|auto",
              help="Data-loading worker processes (auto: this process's share of the CPUs, at most 8; 0 on one CPU).")
@click.option("--max-steps-per-epoch", type=int, default=None, help="Cap the steps of each epoch (quicker, for tests).")
def demo_command(output: str | None, epochs: int, image_size: int, num_workers: str,
                 max_steps_per_epoch: int | None) -> None:
    """Synthetic data + staged fine-tune of a tiny ViT with the CDTM adapter, end to end on CPU."""
    started = time.perf_counter()  # before the imports: torch's import is part of the wait
    from cdft_cli.output import warn
    from cdft_cli.run import print_results
    from cdft_core.config import RunConfig, check_num_workers, validate
    from cdft_core.data.report import warnings_of
    from cdft_core.data.splits import prepare_with_summary
    from cdft_core.data.synthetic import make_synthetic_breakhis
    from cdft_core.data.tables import write_split_file
    from cdft_core.training import engine
    from cdft_core.training.preflight import preflight
    from cdft_core.training.rundir import RunDir

    workers = check_num_workers(num_workers)
    workdir = RunDir(output if output else default_output())
    if workdir.is_local:
        workdir = RunDir(os.path.abspath(workdir.url))
    data_root = workdir.join("data", "BreaKHis_v1")
    split_file = workdir.join("breakhis-splits.csv")
    config = RunConfig(
        dataset="breakhis", data_root=data_root, split_file=split_file, dataset_options=dict(DEMO_OPTIONS),
        backbone=DEMO_BACKBONE, pretrained=False, image_size=image_size, strategy="staged",
        epochs=epochs, lr=1e-3, batch_size=16, warmup_epochs=1.0, num_workers=workers, device="cpu",
        max_steps_per_epoch=max_steps_per_epoch, runs_dir=workdir.join("runs"), log_every=10,
    )
    # every option checked (as `cdft run` checks them) before anything is written: a bad one leaves no files
    validate(config, values_only=True)
    preflight(config)
    click.echo("cdft demo: the images are SYNTHETIC (coloured textures in the BreakHis folder layout, not "
               f"histology) and the backbone ({DEMO_BACKBONE}) has RANDOM weights; this checks the machinery, "
               "the numbers say nothing about real data.")
    click.echo(f"working directory: {workdir.url}" + ("" if output else " (choose another with --output DIR)"))
    if not workdir.exists("data/BreaKHis_v1"):
        click.echo(f"writing synthetic BreakHis-format images to {data_root}")
        make_synthetic_breakhis(workdir.join("data"), **DEMO_DATA)
    # prepared every time (a second): its warnings explain the numbers below
    table, summary = prepare_with_summary("breakhis", data_root, options=DEMO_OPTIONS, seed=1)
    write_split_file(table, split_file)
    click.echo(f"wrote the patient-level split file {split_file} ({len(table)} images, {summary['n_folds']} folds)")
    for note in warnings_of(summary):
        warn(note.replace(" more in --json", " more"))  # prepare's pointer: the demo has no --json
    validate(config)  # now with its data and split file
    click.echo(f"staged fine-tune of {DEMO_BACKBONE} (random init) with the CDTM adapter: "
               f"{epochs} epochs per stage at {image_size} px on CPU")
    summary = engine.main(config)
    if summary is not None:
        print_results(summary)
        click.echo("(synthetic data, random weights: see README.md for real datasets and pretrained backbones)")
    click.echo(f"cdft demo: done in {time.perf_counter() - started:.0f} s (measured: data, split file and training)")
