"""``cdft export``: a run's model as an ONNX or .pt2 file, numerically checked before it is written.

The work is :func:`cdft_core.inference.export.export_run`; this command parses and prints.
"""

from __future__ import annotations

import click


@click.command("export")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.option("-o", "--output", required=True, metavar="FILE", help="The file to write (FILE.json gets the metadata too).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "pt2"]), default=None,
              help="onnx (torch's ONNX exporter) or pt2 (torch.export); default: FILE's extension.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export_command(target: str, output: str, fmt: str | None, as_json: bool) -> None:
    """Export the best model of RUN_DIR (backbone, adapter, head; dynamic batch) to FILE.

    The file carries the input size, interpolation, mean, std and class names; the export
    is compared with the PyTorch model on sample batches and written only if its logits
    agree within 1e-4 (needs `pip install 'cdft[export]'`).

    \b
    Examples:
      cdft export runs/x -o model.onnx
      cdft export runs/x --format pt2 -o model.pt2
    """
    from cdft_cli.output import echo_json
    from cdft_core.inference.export import export_run

    result = export_run(target, output, fmt)
    if as_json:
        echo_json({"path": result.path, "format": result.format, "max_difference": result.max_difference,
                   "tolerance": result.tolerance, "checked_batches": list(result.checked_batches),
                   "sidecar": result.sidecar, "metadata": result.metadata})
        return
    click.echo(f"wrote {result.path} ({result.format}; metadata also in {result.sidecar})")
    click.echo(f"max |difference| vs PyTorch: {result.max_difference:.3g} "
               f"(batches {', '.join(map(str, result.checked_batches))}; tolerance {result.tolerance:g})")
