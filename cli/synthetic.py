"""``cdft make-synthetic KIND DIR``: a small synthetic dataset in a real layout (tests, demo)."""

from __future__ import annotations

import click

from cdft_cli.output import echo_json
from cdft_core.config import MAX_SEED

NEXT_STEP = {
    "breakhis": "cdft prepare breakhis {root} --folds 5 -o breakhis_synthetic.csv",
    "hcrf": "cdft prepare hcrf {root} --folds 4 -o hcrf_synthetic.csv",
}


@click.command("make-synthetic")
@click.argument("kind", type=click.Choice(sorted(NEXT_STEP)))
@click.argument("directory")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print {kind, root, seed} as JSON.")
def make_synthetic_command(kind: str, directory: str, seed: int, as_json: bool) -> None:
    """Write a synthetic KIND tree under DIRECTORY and print its data root.

    breakhis: BreaKHis_v1 layout and file names, 8 types x 3 patients x 4 magnifications
    x 4 images of 96x64 px, plus a patient filed under two malignant types and one with
    two lettered slides under two benign types. hcrf: Normal/Abnormal folders with PNG
    and TIFF images and ground-truth masks to be skipped.

    \b
    Example:
      cdft make-synthetic breakhis /tmp/demo --seed 0
    """
    from cdft_core.data.synthetic import make_synthetic_breakhis, make_synthetic_hcrf

    make = {"breakhis": make_synthetic_breakhis, "hcrf": make_synthetic_hcrf}[kind]
    root = make(directory, seed=seed)
    if as_json:
        echo_json({"kind": kind, "root": root, "seed": seed})
        return
    click.echo(f"wrote a synthetic {kind} dataset; its data root is {root}")
    click.echo("next: " + NEXT_STEP[kind].format(root=root))
