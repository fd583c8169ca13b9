"""``cdft export``: a trained model as one ONNX or ``torch.export`` (.pt2) file, checked before it is published.

The file holds the whole model (backbone, adapter, head: images in, logits out) with a
dynamic batch dimension, and it carries what a consumer needs to feed it: the input size,
interpolation, mean, std and the class names (:func:`export_metadata`). They live in the
file itself (ONNX ``metadata_props["cdft"]``; the .pt2 archive's ``extra/cdft.json``) and
in a sidecar ``FILE.json``, so a reader needs neither cdft nor the run directory.

Why check and why a temporary file: an exporter can trace a graph that differs from the
module (a specialised shape, an unsupported op lowered differently). The export is written
to a temporary sibling, reloaded by the runtime that will serve it (onnxruntime for
ONNX, ``torch.export.load`` for .pt2), run on random batches of sizes other than the
one traced (so a batch dimension baked in as a constant shows up), and compared with the
PyTorch model. Only a file within ``tolerance`` is renamed to FILE; otherwise it is
removed and :class:`ExportMismatch` names the largest difference: no half-checked
file is ever left where a user would pick it up.

The export runs on the CPU in fp32: the file is portable, and the 1e-4 tolerance is an
fp32 tolerance.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from cdft_core.errors import CdftError, UsageError
from cdft_core.files import as_new_file
from cdft_core.inference.inputs import check_output

FORMATS = ("onnx", "pt2")
INSTALL = "cdft export needs the export extra: pip install 'cdft[export]'"
#: Largest absolute logit difference accepted between the export and the PyTorch model (fp32).
TOLERANCE = 1e-4
#: Batch sizes of the check; the trace uses another (:data:`TRACE_BATCH`), so a fixed batch fails.
CHECK_BATCHES = (1, 3)
TRACE_BATCH = 2
INPUT_NAME, OUTPUT_NAME = "image", "logits"
METADATA_FORMAT = 1


class ExportMismatch(CdftError):
    """The written export does not reproduce the PyTorch model within the tolerance."""


@dataclass
class ExportResult:
    """What ``cdft export`` prints: where the file went and how close it is to the model."""

    path: str
    format: str
    max_difference: float
    tolerance: float
    checked_batches: tuple[int, ...]
    sidecar: str
    metadata: dict[str, Any] = field(default_factory=dict)


def format_for(path: str, fmt: str | None) -> str:
    """``fmt`` if given, else the one FILE's extension names (.onnx, .pt2); a usage error otherwise."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
        return fmt
    suffix = os.path.splitext(str(path))[1].lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise UsageError(f"cannot tell the format from {path!r}; pass --format onnx or --format pt2")


def require_extra(fmt: str) -> None:
    """Import what ``fmt`` needs now, so a missing extra is one line before any work is done."""
    try:
        if fmt == "onnx":
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401  (torch's dynamo ONNX exporter needs it)
    except ImportError as exc:
        raise CdftError(INSTALL) from exc


def export_metadata(model: torch.nn.Module, classes: list[str], data_config: dict[str, Any],
                    metadata: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing and labels a consumer needs, as JSON-safe values (also the sidecar's content)."""
    from cdft_core import __version__
    from cdft_core.data.transforms import ResizeSpec

    spec = getattr(model, "spec", {}) or {}
    resize = ResizeSpec.from_data_config(data_config)  # the mode training actually used (after fallbacks)
    channels, height, width = (int(v) for v in data_config["input_size"])
    return {
        "format": METADATA_FORMAT,
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "input_layout": f"float32 Bx{channels}x{height}x{width}, RGB scaled to 0..1, then (x - mean) / std",
        "output_note": "raw logits; softmax over the last axis gives class probabilities",
        "input_size": [channels, height, width],
        "interpolation": resize.interpolation,
        "antialias": bool(resize.antialias),
        "mean": [float(v) for v in data_config["mean"]],
        "std": [float(v) for v in data_config["std"]],
        "classes": [str(c) for c in classes],
        "backbone": spec.get("backbone"),
        "adapter": spec.get("adapter"),
        "checkpoint": str(metadata.get("checkpoint", "")),
        "cdft_version": __version__,
    }


def export_run(target: str, output: str, fmt: str | None = None, *, tolerance: float = TOLERANCE) -> ExportResult:
    """Export the model of a run directory (or checkpoint) ``target`` to ``output``; see the module docstring."""
    from cdft_core.inference.model_loading import load_trained

    fmt = format_for(output, fmt)
    require_extra(fmt)
    if "://" in output or "::" in output:  # written through a local temporary file, then renamed
        raise UsageError(f"cannot write {output!r}: cdft export writes a local file; give a local path "
                         f"(-o model.onnx) and copy the file and its .json where they should go")
    check_output(output, "the export")
    model, classes, data_config, metadata = load_trained(target, device="cpu")
    model = model.float().eval()
    from cdft_core.models.model_change import merge_change

    shape = tuple(int(v) for v in data_config["input_size"])
    before = check_logits(model, shape) if model.spec.get("strategy") else None
    merged = merge_change(model)  # LoRA: W + scale·B·A in plain layers, no peft needed to run the file
    info = export_metadata(model, classes, data_config, metadata)
    if merged:
        info["merged"] = model.spec["strategy"]["name"]
        worst = max(float((a - b).abs().max()) for a, b in zip(before, check_logits(model, shape), strict=True))
        if not worst <= tolerance:  # the export is checked against the merged model: check the merge too
            raise ExportMismatch(f"merging the {info['merged']} layers changed the logits by up to {worst:.3g} "
                                 f"(tolerance {tolerance:g}); nothing was written to {output!r}")
    return export_model(model, output, fmt, info, tolerance=tolerance)


def export_model(model: torch.nn.Module, output: str, fmt: str, info: dict[str, Any], *,
                 tolerance: float = TOLERANCE) -> ExportResult:
    """Write ``model`` (CPU, eval, fp32) to a temporary file, check it, then publish it as ``output``."""
    shape = tuple(int(v) for v in info["input_size"])
    folder = os.path.dirname(os.path.abspath(output))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=f".{fmt}", dir=folder)
    os.close(handle)
    try:
        example = torch.randn(TRACE_BATCH, *shape, generator=torch.Generator().manual_seed(0))
        writer, runner = {"onnx": (_write_onnx, _onnx_runner), "pt2": (_write_pt2, _pt2_runner)}[fmt]
        writer(model, example, temporary, info)
        difference = max_difference(model, runner(temporary), shape)
        if not difference <= tolerance:  # NaN fails too
            raise ExportMismatch(
                f"the {fmt} export differs from the PyTorch model by up to {difference:.3g} "
                f"(tolerance {tolerance:g}); nothing was written to {output!r}"
            )
        as_new_file(temporary)
        os.replace(temporary, output)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    sidecar = _write_sidecar(output, info)
    return ExportResult(output, fmt, difference, tolerance, CHECK_BATCHES, sidecar, info)


def check_logits(model: torch.nn.Module, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """``model``'s logits on the check batches :func:`max_difference` uses (the same fixed seed)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return [model(torch.randn(batch, *shape, generator=generator)).float() for batch in CHECK_BATCHES]


def max_difference(model: torch.nn.Module, runner: Any, shape: tuple[int, ...]) -> float:
    """Largest absolute logit difference between ``runner`` (the reloaded export) and ``model``
    on random batches of :data:`CHECK_BATCHES` images (fixed seed: the same check every time)."""
    generator = torch.Generator().manual_seed(1)
    worst = 0.0
    for batch in CHECK_BATCHES:
        x = torch.randn(batch, *shape, generator=generator)
        with torch.no_grad():
            expected = model(x).float()
        got = torch.as_tensor(runner(x)).float()
        if got.shape != expected.shape:
            raise ExportMismatch(
                f"the export returns shape {tuple(got.shape)} for a batch of {batch}, the model {tuple(expected.shape)}"
            )
        worst = max(worst, float((got - expected).abs().max()))
    return worst


# -- ONNX ----------------------------------------------------------------------------


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, info: dict[str, Any]) -> None:
    """torch's dynamo exporter (``torch.export`` underneath) with a symbolic batch; metadata in ``metadata_props``."""
    batch = torch.export.Dim("batch")
    try:
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes={_input_argument(model): {0: batch}}, verbose=False, optimize=True,
        )
    except Exception as exc:
        raise CdftError(f"torch could not export the model to ONNX ({type(exc).__name__}: {_first_line(exc)})") from exc
    program.model.metadata_props["cdft"] = json.dumps(info)
    # one self-contained file: external data would be named after the temporary file
    program.save(path, external_data=False)


def _onnx_runner(path: str) -> Any:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]


def read_onnx_metadata(path: str) -> dict[str, Any]:
    """The cdft metadata stored in an exported ONNX file (``metadata_props["cdft"]``)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    if "cdft" not in props:
        raise UsageError(f"{path!r} carries no cdft metadata; it was not written by `cdft export`")
    return json.loads(props["cdft"])


# -- torch.export (.pt2) -------------------------------------------------------------


def _write_pt2(model: torch.nn.Module, example: torch.Tensor, path: str, info: dict[str, Any]) -> None:
    """``torch.export.export`` with a symbolic batch, saved with the metadata as ``extra/cdft.json``."""
    batch = torch.export.Dim("batch")
    try:
        program = torch.export.export(model, (example,), dynamic_shapes={_input_argument(model): {0: batch}})
    except Exception as exc:
        raise CdftError(f"torch.export could not export the model ({type(exc).__name__}: {_first_line(exc)})") from exc
    torch.export.save(program, path, extra_files={"cdft.json": json.dumps(info)})


def _pt2_runner(path: str) -> Any:
    program = torch.export.load(path)
    module = program.module()
    return lambda x: module(x).detach()


def read_pt2_metadata(path: str) -> dict[str, Any]:
    """The cdft metadata stored in an exported .pt2 archive."""
    extra = {"cdft.json": ""}
    torch.export.load(path, extra_files=extra)
    if not extra["cdft.json"]:
        raise UsageError(f"{path!r} carries no cdft metadata; it was not written by `cdft export`")
    return json.loads(extra["cdft.json"])


# -- helpers -------------------------------------------------------------------------


def _input_argument(model: torch.nn.Module) -> str:
    """The name of ``forward``'s image argument: ``dynamic_shapes`` is keyed by it."""
    import inspect

    return next(iter(inspect.signature(model.forward).parameters))


def _write_sidecar(output: str, info: dict[str, Any]) -> str:
    from cdft_core.files import atomic_write

    sidecar = f"{output}.json"
    atomic_write(sidecar, (json.dumps(info, indent=2) + "\n").encode(), what="export metadata")
    return sidecar


def _first_line(exc: BaseException) -> str:
    """An exporter's first error line: its messages run to pages of graph dumps."""
    from cdft_core.text import one_line

    text = str(exc).strip()
    return one_line(text.splitlines()[0] if text else exc)
