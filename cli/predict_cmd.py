"""``cdft predict``: class probabilities of a trained run or checkpoint for any images.

The work is :mod:`cdft_core.inference.predict`; this command parses, writes the files
atomically and prints the final count line (docs/inference.md#cdft-predict).
"""

from __future__ import annotations

import json

import click


@click.command("predict")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", default=None,
              help="Predictions file (CSV; JSON with --json). Without it --json prints to stdout.")
@click.option("--json", "as_json", is_flag=True, help="Write JSON ({predictions, groups, errors}) instead of CSV.")
@click.option("--group-by", default=None,
              help="Per-group table: a regular expression on the path (first capture group, else the whole "
                   "match) or column:NAME of the INPUT CSV. Written to <output stem>-groups.csv.")
@click.option("--tta", type=click.Choice(["none", "flip", "flip-hv"]), default="none", show_default=True,
              help="Test-time augmentation: average the softmax over horizontal (flip) or all (flip-hv) flips.")
@click.option("--batch-size", type=int, default=None, help="Images per batch (default: the run's evaluation batch).")
@click.option("--num-workers", default="auto", show_default=True, help="Decoding worker processes: a number, or auto.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def predict_command(target: str, inputs: tuple[str, ...], output: str | None, as_json: bool, group_by: str | None,
                    tta: str, batch_size: int | None, num_workers: str, device: str) -> None:
    """Predict INPUT images with the best checkpoint of RUN_DIR (or CHECKPOINT).

    INPUT: image files, folders (recursive), glob patterns, CSVs with an image_path
    column, or fsspec URLs. One output row per input row, in order (an image given twice is
    two rows). Unreadable images are listed with an error; the exit code is 1 when no image
    at all could be predicted. The second example groups BreakHis images by patient.

    \b
    Examples:
      cdft predict runs/x slides/ -o predictions.csv
      cdft predict runs/x list.csv -o p.csv --group-by 'SOB_[BM]_[A-Z]+-\\d+-(\\d+)'
      cdft predict runs/x 'tiles/**/*.png' --json --tta flip > p.json
    """
    from cdft_core.config import check_num_workers, resolve_device
    from cdft_core.errors import UsageError
    from cdft_core.files import atomic_write
    from cdft_core.inference.inputs import check_output, collect_inputs
    from cdft_core.inference.model_loading import load_trained
    from cdft_core.inference.predict import group_table, groups_path, image_rows, predict_images, to_csv

    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if output is None and not as_json:
        raise UsageError("give -o FILE (or --json to print the predictions)")
    workers = check_num_workers(num_workers)
    resolve_device(device)  # a device this machine lacks: one usage line before any work
    if output is not None:  # before any compute: an unwritable output fails in one line
        check_output(output, "predictions file")
        if group_by and not as_json:
            check_output(groups_path(output), "groups file")
    images = collect_inputs(inputs, keep_repeats=True)
    model, classes, data_config, metadata = load_trained(target, device)
    table = predict_images(model, classes, data_config, images, metadata=metadata, batch_size=batch_size,
                           num_workers=workers, tta=tta, group_by=group_by)
    rows, groups = image_rows(table), group_table(table)
    if as_json:
        text = json.dumps({"checkpoint": metadata["checkpoint"], "classes": classes, "tta": tta,
                           "predictions": rows, "groups": groups if table.groups is not None else None,
                           "errors": table.failed}, indent=2)
        if output is None:
            click.echo(text)
        else:
            atomic_write(output, (text + "\n").encode(), what="predictions file")
    else:
        assert output is not None
        atomic_write(output, to_csv(rows).encode(), what="predictions file")  # the main file first
        if table.groups is not None:
            atomic_write(groups_path(output), to_csv(groups).encode(), what="groups file")
    where = output or "the JSON"
    extra = f"; groups in {groups_path(output)}" if output and table.groups is not None and not as_json else ""
    click.echo(f"{len(images)} images, {table.failed} could not be read (listed in {where}){extra}",
               err=output is None)
    if table.failed == len(images):  # nothing predicted: fail, and keep the count line last
        click.get_current_context().exit(1)
