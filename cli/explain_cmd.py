"""``cdft explain``: Grad-CAM overlays of a run's model over images, and one grid PNG.

The work is :func:`cdft_core.inference.explain.explain`; this command parses and prints.
"""

from __future__ import annotations

import click


@click.command("explain")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("-o", "--output", "output_dir", required=True, metavar="DIR", help="Folder for the overlays and grid.png.")
@click.option("--class", "class_name", default=None, metavar="NAME",
              help="Explain this class for every image (default: each image's predicted class).")
@click.option("--no-grid", is_flag=True, help="Write the overlays only, no grid.png.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record per image.")
def explain_command(target: str, images: tuple[str, ...], output_dir: str, class_name: str | None, no_grid: bool,
                    device: str, as_json: bool) -> None:
    """Grad-CAM heatmaps of RUN_DIR's model over each IMAGE (files, folders, globs or a CSV).

    ConvNeXt: the last stage; ViT: the last block's tokens (with CDTM, the backbone tokens
    the adapter reads). One `<image>.cam.png` per image, at the image's size, and
    grid.png with the classes and probabilities (needs `pip install 'cdft[explain]'`).

    \b
    Examples:
      cdft explain runs/x slide1.png slide2.png -o cams/
      cdft explain runs/x images/ --class ductal_carcinoma -o cams/
    """
    from cdft_cli.output import echo_json
    from cdft_core.config import resolve_device
    from cdft_core.inference.explain import GRID_MAX, explain

    resolve_device(device)  # a device this machine lacks: one usage line before any work
    results = explain(target, list(images), output_dir, class_name=class_name, device=device, grid=not no_grid)
    if as_json:
        echo_json([{"image": r.image, "overlay": r.overlay, "class": r.explained, "probability": r.probability,
                    "predicted": r.predicted, "predicted_probability": r.predicted_probability} for r in results])
    else:
        for r in results:
            click.echo(f"{r.overlay}  {r.explained} p={r.probability:.3f}  ({r.image})")
        if not no_grid and results:
            note = f" (the first {GRID_MAX} of {len(results)} images)" if len(results) > GRID_MAX else ""
            click.echo(f"grid: {output_dir.rstrip('/')}/grid.png{note}")
    for path, reason in results.failed.items():
        click.echo(f"cannot read {path}: {reason}", err=True)
    where = "the lines above" if results else "the lines above; nothing written"
    if results.failed or not results:
        click.echo(f"{results.total} images, {len(results.failed)} could not be read (listed in {where})", err=True)
    if not results:
        click.get_current_context().exit(1)
