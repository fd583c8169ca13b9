"""Open a trained model (a run directory or a checkpoint) for inference.

One loader for ``cdft eval``, ``predict``, ``embed``, ``export`` and ``explain``: the
checkpoint carries the model spec (rebuilt without downloading anything), the class
names and the run's configuration, so every command sees the same model, the same
preprocessing and the same classes as the run that wrote it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from cdft_core.errors import CdftError, UnknownComponent, UsageError
from cdft_core.text import one_line


def load_checkpoint_model(checkpoint: str, device: str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model saved in ``checkpoint`` (a file path or URL), on ``device``, in eval mode, and its metadata."""
    from cdft_core.training.checkpoint import read_model

    tensors, meta = read_model(checkpoint)
    return model_from_tensors(tensors, meta, checkpoint, device), meta


def model_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], checkpoint: str,
                       device: str = "cpu") -> torch.nn.Module:
    """Rebuild the model of an already-read checkpoint (``read_model``) and load its tensors.

    A state dict that does not fit its own spec is an error (not a silent partial load):
    predictions from a half-loaded model would look plausible and be wrong.
    """
    from cdft_core.models.model import model_from_spec

    check_class_count(meta, checkpoint)
    with recorded_plugins(meta):
        model = model_from_spec(meta["cdft_spec"])
    own = model.state_dict()
    mismatched = [k for k, v in tensors.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:  # torch's own error is several lines of "size mismatch for ..."
        raise CdftError(f"{checkpoint!r} does not fit its own model spec ({len(mismatched)} tensor(s) of another "
                        f"shape, e.g. {mismatched[0]} {tuple(tensors[mismatched[0]].shape)} vs "
                        f"{tuple(own[mismatched[0]].shape)}); the file is damaged or was edited")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CdftError(f"{checkpoint!r} does not fit its own model spec ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors)")
    model.to(device)
    model.eval()
    return model


def check_class_count(meta: Mapping[str, Any], checkpoint: str) -> None:
    """The class names a checkpoint carries must be as many as its head's outputs: otherwise
    every prediction would be reported under the wrong (or a missing) class name."""
    classes, spec = meta.get("cdft_classes"), meta.get("cdft_spec")
    if not isinstance(classes, list) or not isinstance(spec, Mapping) or "num_classes" not in spec:
        return  # nothing to compare (read_model and model_from_spec report what is missing)
    if spec["num_classes"] != len(classes):
        raise CdftError(f"{checkpoint!r} has damaged metadata ({len(classes)} class names but num_classes "
                        f"{one_line(repr(spec['num_classes']), 40)} in its model spec); it was not written by this "
                        f"cdft, or the file is corrupt")


@contextlib.contextmanager
def recorded_plugins(meta: Mapping[str, Any]) -> Iterator[None]:
    """An unknown component of a checkpoint names the third-party plugin that provided it in
    training (``cdft_plugins`` in its metadata) and the package to install."""
    try:
        yield
    except UnknownComponent as exc:
        recorded = meta.get("cdft_plugins")
        row = recorded.get(exc.kind) if isinstance(recorded, Mapping) else None
        if (isinstance(row, Mapping) and row.get("name") == exc.name
                and row.get("distribution") not in (None, "cdft", "?")):
            raise UsageError(f"{exc}; the checkpoint was made with {exc.kind} {exc.name!r} of plugin "
                             f"{row.get('plugin')!r} ({row['distribution']} {row.get('version')}): install "
                             f"that package here (pip install {row['distribution']})") from exc
        raise


def inference_precision(saved: Any, device: str) -> str:
    """The precision to run a saved model at on ``device`` (``cuda``, ``cuda:1``, ``cpu``...).

    The run's own precision (``auto`` when unset), except that ``fp16`` off CUDA falls back
    to ``fp32``: training needed fp16's grad scaler (hence CUDA), inference has none.
    """
    from cdft_core.config import resolve_precision

    kind = str(device).split(":", 1)[0]
    requested = str(saved or "auto")
    if requested == "fp16" and kind != "cuda":
        requested = "fp32"
    return resolve_precision(requested, kind)


def incomplete_run_warning(target: str) -> str | None:
    """One warning line when ``target`` is a run directory without ``summary.json`` (an incomplete run)."""
    from cdft_core.training.rundir import RunDir

    rundir = RunDir(target)
    try:
        if rundir.fs.isdir(rundir.path) and not rundir.exists("summary.json"):
            return (f"warning: {target!r} is an incomplete run (no summary.json); "
                    f"using its latest stage's best checkpoint")
    except OSError:
        return None
    return None


def model_file(target: str) -> str:
    """The checkpoint file of ``target`` (a run directory or a checkpoint), refusing at once a
    file that is plainly not one.

    ``cdft eval split.csv`` (the split file where the run goes) would otherwise fail deep in
    safetensors ("header too large") as a runtime error; a file neither named
    ``.safetensors`` nor shaped like one is the user's mix-up (exit 2). A damaged
    ``.safetensors`` file keeps :func:`read_model`'s runtime error.
    """
    from cdft_core.training.evaluation import find_checkpoint

    checkpoint = find_checkpoint(target)
    if not checkpoint.lower().endswith(".safetensors") and not _safetensors_shaped(checkpoint):
        raise UsageError(f"{one_line(checkpoint, 120)!r} is not a model checkpoint; pass a run directory or "
                         f"a .safetensors checkpoint written by cdft run")
    return checkpoint


def _safetensors_shaped(path: str) -> bool:
    """Whether ``path`` starts like safetensors (a u64 header size within the file, then ``{``).

    Anything but a regular file counts as shaped: :func:`read_model` names devices and pipes
    (a FIFO read here would block), and a file that cannot be opened here fails there too.
    """
    import fsspec

    try:
        opened = fsspec.open(path, "rb")
        info = opened.fs.info(opened.path)
        if info.get("type") != "file":
            return True
        with opened as handle:
            head = handle.read(9)
    except (OSError, ValueError):
        return True
    from cdft_core.models.weights import safetensors_start

    size = info.get("size")
    return safetensors_start(head, None if size is None else int(size))


def load_trained(target: str, device: str = "auto") -> tuple[torch.nn.Module, list[str], dict[str, Any], dict[str, Any]]:
    """``(model, classes, data_config, metadata)`` of a RUN_DIR (its final best checkpoint) or a checkpoint.

    ``device``: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...; the model is moved there and put
    in eval mode. ``metadata`` is the checkpoint's (``cdft_spec``, ``cdft_config``,
    ``cdft_classes``...) with ``checkpoint`` added: the file actually opened, to report.
    """
    from cdft_core.config import resolve_device

    checkpoint = model_file(target)
    warning = incomplete_run_warning(target)
    if warning:
        import click

        click.echo(warning, err=True)
    model, meta = load_checkpoint_model(checkpoint, resolve_device(device))
    classes = meta.get("cdft_classes")
    if not classes:
        raise UsageError(f"{checkpoint!r} has no class names in its metadata; it was not written by `cdft run`")
    metadata = dict(meta, checkpoint=checkpoint)
    return model, [str(c) for c in classes], dict(model.data_config), metadata
