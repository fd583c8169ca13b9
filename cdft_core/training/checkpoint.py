"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

Two kinds of files:

- a *model* file, ``best.safetensors``: the model's state dict plus string metadata —
  the model spec (``model_from_spec`` rebuilds the architecture from it without any
  download), the run's resolved config, the class names, stage and epoch. It is
  self-contained: ``cdft eval`` needs nothing else.
- a *resume* state in ``RUN/resume/``: the model, the optimizer's tensors, the RNG
  states, the ``--ema`` average (``<tag>.model.safetensors``, ``<tag>.state.safetensors``) and one JSON file
  with the rest (optimizer hyper-parameters, schedule, grad scaler, progress,
  best-so-far). The JSON is written last and names the tensor files, so it is the
  commit record: a run killed while saving still has its previous complete state.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from cdft_core.errors import CdftError, UsageError
from cdft_core.text import one_line
from cdft_core.training.rundir import RunDir

RESUME_DIR = "resume"
#: bytes :func:`read_bounded` reads past a file's stated size: enough to see that it grew, no more
READ_MARGIN = 1 << 16


# -- model files ----------------------------------------------------------------------
def save_model(rundir: RunDir, name: str, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write ``state_dict`` as safetensors; ``metadata`` values are JSON-encoded strings."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {str(k): json.dumps(v) for k, v in metadata.items()}
    rundir.write_bytes(name, save(tensors, metadata=meta))


def load_model_file(data: bytes, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a model file's bytes."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        raw = _header_metadata(data)
    except Exception as exc:
        raise CdftError(f"{source} is not a readable safetensors file: {exc}") from None
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):  # deep nesting: kept as text, then refused below
            meta[key] = value
    problem = _metadata_problem(meta)
    if problem:
        raise CdftError(f"{source!r} has damaged metadata ({problem}); it was not written by this cdft, "
                        f"or the file is corrupt")
    return tensors, meta


def _metadata_problem(meta: Mapping[str, Any]) -> str | None:
    """What is wrong with the metadata cdft reads back, or None.

    A value that is not JSON is kept as its raw string above; checked here so that a damaged
    file stops with one line instead of an ``AttributeError`` deep in the config or spec code.
    """
    for key in ("cdft_spec", "cdft_config"):
        if key in meta and not isinstance(meta[key], dict):
            return f"{key} is not a JSON object"
    classes = meta.get("cdft_classes")
    if "cdft_classes" in meta and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        return "cdft_classes is not a list of strings"
    return None


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian header size, then JSON."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__", {}))


def read_model(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model file given as a path or URL (``cdft eval CHECKPOINT``)."""
    import fsspec

    try:
        opened = fsspec.open(path, "rb")
        data = read_bounded(opened.fs, opened.path, path)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path!r} does not exist") from None
    except OSError as exc:
        raise CdftError(f"cannot read checkpoint {path!r}: {exc.strerror or exc}") from None
    except UsageError as exc:  # a directory, a device, a pipe
        raise UsageError(f"{exc}; pass a .safetensors checkpoint file") from None
    tensors, meta = load_model_file(data, path)
    if "cdft_spec" not in meta:
        raise UsageError(f"{path!r} is not a cdft checkpoint (no model spec in its metadata)")
    return tensors, meta


#: the most bytes a run's JSON record (summary, resume record) may hold
MAX_RECORD_BYTES = 64 << 20


def read_bounded(fs: Any, inner: str, source: str, most: int | None = None) -> bytes:
    """The bytes of one regular file, never more than its stated size plus :data:`READ_MARGIN`.

    Without the checks a path to a device (``/dev/zero``) would be read until memory runs
    out, and one to a FIFO would block for ever; the margin shows a file that grew meanwhile.
    ``most``: a file stated bigger than that is damaged, not read (a run's JSON records are
    kilobytes; a sparse 1 GB one took GBs to parse).
    """
    info = fs.info(inner)
    if info.get("type") != "file":
        kind = "a directory" if info.get("type") == "directory" else "not a regular file (a device or a pipe?)"
        raise UsageError(f"{source!r} is {kind}")
    size = info.get("size")
    if most is not None and (size is None or int(size) > most):
        raise CdftError(f"{source!r} is {'of unknown size' if size is None else f'{int(size):,} bytes'}, more than "
                        f"the {most:,} such a record can need: it is damaged or not cdft's")
    with fs.open(inner, "rb") as handle:
        data = handle.read() if size is None else handle.read(int(size) + READ_MARGIN)
    if size is not None and len(data) > int(size):
        raise CdftError(f"{source!r} grew while it was read (beyond its {size} bytes); read it once it is complete")
    return data


# -- optimizer state -------------------------------------------------------------------
def flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors keyed ``state.<param>.<key>``, JSON-safe rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": _jsonable(state["param_groups"]), "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`: a state dict ``Optimizer.load_state_dict`` takes."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("state."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for pid, entry in rest.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    groups = []
    for saved in rest["param_groups"]:
        group = dict(saved)
        if isinstance(group.get("betas"), list):  # JSON has no tuples; Adam's state dict has one
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# -- RNG state ------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: torch (CPU and CUDA) as tensors, Python and NumPy as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    rest = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, rest


def restore_rng(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = rest["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# -- resume state ---------------------------------------------------------------------
def save_resume(
    rundir: RunDir,
    *,
    tag: str,
    model_state: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    rng_states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    progress: Mapping[str, Any],
    ema_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write one complete resumable state, then drop the older ones.

    ``rng_states`` holds one entry per rank (each rank's augmentation-free RNG stream
    for dropout and friends). ``progress`` is any JSON-safe record (epoch, step,
    schedule, scaler, best-so-far...). ``ema_state``: the stage's moving average (``--ema``),
    stored beside the optimizer's tensors as ``ema.<parameter name>``.
    """
    from safetensors.torch import save

    opt_tensors, opt_rest = flatten_optimizer(optimizer_state)
    state_tensors = {f"optimizer.{k}": v for k, v in opt_tensors.items()}
    rng_rest = []
    for rank, (tensors, rest) in enumerate(rng_states):
        state_tensors.update({f"rng.{rank}.{k}": v.to("cpu").contiguous() for k, v in tensors.items()})
        rng_rest.append(rest)
    state_tensors.update({f"ema.{k}": v.detach().to("cpu").contiguous() for k, v in (ema_state or {}).items()})
    model_name = f"{RESUME_DIR}/{tag}.model.safetensors"
    state_name = f"{RESUME_DIR}/{tag}.state.safetensors"
    save_model(rundir, model_name, model_state, {"tag": tag})
    rundir.write_bytes(state_name, save(state_tensors))
    record = {
        "tag": tag,
        "model_file": model_name,
        "state_file": state_name,
        "optimizer": opt_rest,
        "rng": rng_rest,
        "world_size": len(rng_states),
        "ema": ema_state is not None,
        "progress": _jsonable(dict(progress)),
    }
    rundir.write_text(f"{RESUME_DIR}/{tag}.json", json.dumps(record, indent=1))
    for name in rundir.listdir(RESUME_DIR):
        if not name.startswith(tag + "."):
            rundir.remove(f"{RESUME_DIR}/{name}")


def latest_resume(rundir: RunDir) -> dict[str, Any] | None:
    """The newest committed resume state (its JSON record plus loaded tensors), or None.

    The record and the files it names are decoded defensively: a truncated or edited state
    is one error line naming it (never a raw ``JSONDecodeError``), and the files it names
    must lie inside the run directory.
    """
    records = [n for n in rundir.listdir(RESUME_DIR) if n.endswith(".json")]
    if not records:
        return None
    records.sort()  # tags sort in training order (zero-padded)
    name = f"{RESUME_DIR}/{records[-1]}"
    try:
        return _read_resume(rundir, name)
    except (CdftError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        missing = isinstance(exc, FileNotFoundError) and exc.filename
        why = f"{exc.filename} is missing" if missing else one_line(exc, 200)
        raise damaged_resume(rundir.join(name), why) from None


def damaged_resume(path: str, why: str) -> CdftError:
    """The one error line of a resume state that cannot be used, with the way out."""
    return CdftError(f"resume state {path!r} is damaged ({why}); start a new run, or resume from an intact copy "
                     f"of the run")


def _read_resume(rundir: RunDir, name: str) -> dict[str, Any]:
    from safetensors.torch import load

    record = json.loads(read_bounded(rundir.fs, f"{rundir.path}/{name}", name, most=MAX_RECORD_BYTES))
    problem = _resume_record_problem(record)
    if problem:
        raise ValueError(problem)
    model_file, state_file = record["model_file"], record["state_file"]
    model, _ = load_model_file(read_bounded(rundir.fs, f"{rundir.path}/{model_file}", model_file), model_file)
    data = read_bounded(rundir.fs, f"{rundir.path}/{state_file}", state_file)
    try:
        state = load(data)
    except Exception as exc:  # safetensors raises its own error type
        raise ValueError(f"{state_file!r} is not a readable safetensors file: {one_line(exc, 120)}") from None
    optimizer_tensors = {k[len("optimizer."):]: v for k, v in state.items() if k.startswith("optimizer.")}
    rng = []
    for rank, rest in enumerate(record["rng"]):
        prefix = f"rng.{rank}."
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if "torch" not in tensors:
            raise ValueError(f"{state_file!r} lacks the RNG state of rank {rank}")
        rng.append((tensors, rest))
    return {
        "tag": record["tag"],
        "model": model,
        "optimizer": unflatten_optimizer(optimizer_tensors, record["optimizer"]),
        "rng": rng,
        "ema": {k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")} if record.get("ema") else None,
        "progress": record["progress"],
        "source": rundir.join(name),
    }


def _resume_record_problem(record: Any) -> str | None:
    """What makes a resume record unusable (the shape :func:`save_resume` writes), or None."""
    if not isinstance(record, dict):
        return "its record is not a JSON object"
    for key in ("model_file", "state_file"):
        if not inside_run(record.get(key)):
            return f"{key} {one_line(repr(record.get(key)), 80)} is not a file inside the run"
    for key, kind, what in (("tag", str, "a string"), ("optimizer", dict, "a JSON object"), ("rng", list, "a list"),
                            ("progress", dict, "a JSON object")):
        if not isinstance(record.get(key), kind):
            return f"{key} is not {what}"
    if not isinstance(record["optimizer"].get("param_groups"), list):
        return "optimizer.param_groups is not a list"
    for rest in record["rng"]:
        if not (isinstance(rest, dict) and isinstance(rest.get("python"), list) and len(rest["python"]) == 3
                and isinstance(rest.get("numpy"), list) and len(rest["numpy"]) == 5):
            return "an RNG state is not the one cdft writes"
    return None


def inside_run(name: Any) -> bool:
    """Whether ``name`` is a relative path that stays inside its run directory.

    Names read back from a run's own files (``summary.json``, resume records) are joined to
    the run directory: an absolute path, a URL or a ``..`` in a damaged or hostile file must
    not make cdft open a file elsewhere on the machine.
    """
    if not isinstance(name, str) or not name or "\x00" in name or "://" in name or "::" in name:
        return False
    if name.startswith(("/", "\\", "~")) or (len(name) > 1 and name[1] == ":"):
        return False
    return all(part not in ("", ".", "..") for part in name.replace("\\", "/").split("/"))


def resume_tag(stage_index: int, epoch: int, step: int) -> str:
    """Zero-padded so that names sort in training order."""
    return f"s{stage_index:02d}-e{epoch:05d}-b{step:07d}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a JSON checkpoint record")
