"""``cdft embed``: per-image features of a trained run or a bare backbone, to one file.

The work is :mod:`cdft_core.inference.embed` (its docstring gives the file format); this
command parses, writes the file atomically and prints the final count line.
"""

from __future__ import annotations

import click


@click.command("embed")
@click.argument("target", metavar="[RUN_DIR|CHECKPOINT]", required=False)
@click.argument("inputs", metavar="INPUT...", nargs=-1)
@click.option("--backbone", default=None, help="Embed with this backbone's pooled output instead of a trained run.")
@click.option("--no-pretrained", is_flag=True, help="With --backbone: random weights (tests).")
@click.option("--weights", default=None, metavar="FILE",
              help="With --backbone: local weight file (safetensors or torch state dict), for offline machines.")
@click.option("--image-size", type=int, default=None, help="With --backbone: input size in pixels.")
@click.option("--pooled", is_flag=True, help="From a run: the backbone's pooled output, not the adapter's.")
@click.option("-o", "--output", required=True, help="Output file: .safetensors (default) or .parquet.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per batch.")
@click.option("--num-workers", default="auto", show_default=True, help="Decoding worker processes: a number, or auto.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def embed_command(target: str | None, inputs: tuple[str, ...], backbone: str | None, no_pretrained: bool,
                  weights: str | None, image_size: int | None, pooled: bool, output: str, batch_size: int, num_workers: str,
                  device: str) -> None:
    """Write one feature row per readable INPUT image (paths in the file's metadata).

    \b
    Examples:
      cdft embed runs/x slides/ -o features.safetensors
      cdft embed --backbone vit_base_patch16_clip_224.openai 'tiles/*.png' -o clip.safetensors
      cdft embed --backbone vit_base_patch16_224 --weights vit.safetensors tiles/ -o f.safetensors
    """
    from cdft_core.config import check_num_workers, resolve_device
    from cdft_core.errors import UsageError
    from cdft_core.files import atomic_write
    from cdft_core.inference.embed import backbone_model, check_embed_output, embed_images, embedding_bytes
    from cdft_core.inference.inputs import check_output, collect_inputs
    from cdft_core.inference.model_loading import inference_precision

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    workers = check_num_workers(num_workers)
    resolve_device(device)  # a device this machine lacks: one usage line before any work
    if backbone is None:  # a run's checkpoint fixes its weights and input size: these would be ignored
        for name, given, what in (("--weights", weights, "weights"), ("--no-pretrained", no_pretrained, "weights"),
                                  ("--image-size", image_size is not None, "input size")):
            if given:
                raise UsageError(f"{name} applies to --backbone NAME; a run's checkpoint holds its own {what}: "
                                 f"drop {name}")
    if weights and no_pretrained:
        raise UsageError("--no-pretrained and --weights contradict each other; drop one")
    if backbone is None and not target:
        raise UsageError("give RUN_DIR|CHECKPOINT, or --backbone NAME")
    # every usage check before any weights are looked for or model loaded: a typo costs no download
    check_output(output, "embeddings file")
    check_embed_output(output)
    if backbone is not None:
        inputs = ((target,) if target else ()) + inputs  # no RUN_DIR: the first argument is an INPUT
    images = collect_inputs(inputs, keep_repeats=True)
    if backbone is not None:
        torch_device = resolve_device(device)
        model = backbone_model(backbone, pretrained=not no_pretrained, weights=weights,
                               image_size=image_size).to(torch_device)
        source, feature, precision = backbone, "pooled", inference_precision("auto", torch_device)
    else:
        from cdft_core.inference.model_loading import load_trained

        assert target is not None
        model, _, _, metadata = load_trained(target, device)
        config = metadata.get("cdft_config") or {}
        source, feature = metadata["checkpoint"], "pooled" if pooled else "adapter"
        precision = inference_precision(config.get("precision"), next(model.parameters()).device.type)
    result = embed_images(model, images, feature=feature, source=source, batch_size=batch_size,
                          num_workers=workers, precision=precision)
    if result.paths:
        atomic_write(output, embedding_bytes(result, output), what="embeddings file")
    for path, reason in result.errors.items():
        click.echo(f"cannot read {path}: {reason}", err=True)
    where = output if result.paths else "the lines above; nothing written"
    failed = len(images) - len(result.paths)  # input rows without features (a repeated bad image counts per row)
    click.echo(f"{len(images)} images, {failed} could not be read (listed in {where})")
    if not result.paths:
        click.get_current_context().exit(1)
