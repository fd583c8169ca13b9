"""``cdft demo``: the whole pipeline on a fresh machine, on CPU, in under a minute on 2 cores.

It writes a small synthetic BreakHis-format dataset, builds its patient-level split
file the way ``cdft prepare`` does, and runs a ``staged`` fine-tune (stage 1: frozen
backbone + CDTM adapter + head; stage 2: everything, from stage 1's best weights at a
tenth of the learning rate) of timm's tiny ``test_vit`` with random weights — then prints
the result table and the TensorBoard command. The images are synthetic and the weights
random: the demo shows that the machinery works, not how well a real backbone does.
"""

from __future__ import annotations

import click

DEMO_BACKBONE = "test_vit"
DEMO_OPTIONS = {"task": "malignant-subtype", "magnification": "all"}  # the paper's task, every magnification
# five patients per tumour type and five folds: every fold holds patients of every class
DEMO_DATA = {"patients_per_type": 5, "images_per_magnification": 2}


@click.command("demo")
@click.option("--output", default="cdft-demo", show_default=True,
              help="Working directory: synthetic data, split file and runs/ go here (reused by later demos).")
@click.option("--epochs", type=int, default=5, show_default=True, help="Epochs per stage.")
@click.option("--image-size", type=int, default=64, show_default=True, help="Input size of the tiny ViT.")
@click.option("--num-workers", type=int, default=0, show_default=True, help="Data-loading worker processes.")
@click.option("--max-steps-per-epoch", type=int, default=None, help="Cap the steps of each epoch (quicker, for tests).")
def demo_command(output: str, epochs: int, image_size: int, num_workers: int, max_steps_per_epoch: int | None) -> None:
    """Synthetic data + staged fine-tune of a tiny ViT with the CDTM adapter, end to end on CPU."""
    from cdft_cli.run import print_results
    from cdft_core.config import RunConfig, validate
    from cdft_core.data.splits import prepare
    from cdft_core.data.synthetic import make_synthetic_breakhis
    from cdft_core.data.tables import write_split_file
    from cdft_core.training import engine
    from cdft_core.training.rundir import RunDir

    workdir = RunDir(output)
    data_root = workdir.join("data", "BreaKHis_v1")
    split_file = workdir.join("breakhis-splits.csv")
    click.echo("cdft demo: the images are SYNTHETIC (coloured textures in the BreakHis folder layout, not "
               f"histology) and the backbone ({DEMO_BACKBONE}) has RANDOM weights; this checks the machinery, "
               "the numbers say nothing about real data.")
    if not workdir.exists("data/BreaKHis_v1"):
        click.echo(f"writing synthetic BreakHis-format images to {data_root}")
        make_synthetic_breakhis(workdir.join("data"), **DEMO_DATA)
    if not workdir.exists("breakhis-splits.csv"):
        table = prepare("breakhis", data_root, options=DEMO_OPTIONS, seed=1)
        write_split_file(table, split_file)
        click.echo(f"wrote the patient-level split file {split_file} ({len(table)} images, 5 folds)")
    config = RunConfig(
        dataset="breakhis", data_root=data_root, split_file=split_file, dataset_options=dict(DEMO_OPTIONS),
        backbone=DEMO_BACKBONE, pretrained=False, image_size=image_size, strategy="staged",
        epochs=epochs, lr=1e-3, batch_size=16, warmup_epochs=1.0, num_workers=num_workers, device="cpu",
        max_steps_per_epoch=max_steps_per_epoch, runs_dir=workdir.join("runs"), log_every=10,
    )
    validate(config)
    click.echo(f"staged fine-tune of {DEMO_BACKBONE} (random init) with the CDTM adapter: "
               f"{epochs} epochs per stage at {image_size} px on CPU")
    summary = engine.main(config)
    if summary is not None:
        print_results(summary)
        click.echo("(synthetic data, random weights: see README.md for real datasets and pretrained backbones)")
