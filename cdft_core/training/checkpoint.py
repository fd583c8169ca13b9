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
from cdft_core.training.rundir import RunDir

RESUME_DIR = "resume"


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
        except json.JSONDecodeError:
            meta[key] = value
    return tensors, meta


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian header size, then JSON."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return dict(header.get("__metadata__", {}))


def read_model(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a model file given as a path or URL (``cdft eval CHECKPOINT``)."""
    import fsspec

    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path!r} does not exist") from None
    tensors, meta = load_model_file(data, path)
    if "cdft_spec" not in meta:
        raise UsageError(f"{path!r} is not a cdft checkpoint (no model spec in its metadata)")
    return tensors, meta


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
    """The newest committed resume state (its JSON record plus loaded tensors), or None."""
    from safetensors.torch import load

    records = [n for n in rundir.listdir(RESUME_DIR) if n.endswith(".json")]
    if not records:
        return None
    records.sort()  # tags sort in training order (zero-padded)
    record = json.loads(rundir.read_text(f"{RESUME_DIR}/{records[-1]}"))
    model, _ = load_model_file(rundir.read_bytes(record["model_file"]), record["model_file"])
    state = load(rundir.read_bytes(record["state_file"]))
    optimizer_tensors = {k[len("optimizer."):]: v for k, v in state.items() if k.startswith("optimizer.")}
    rng = []
    for rank, rest in enumerate(record["rng"]):
        prefix = f"rng.{rank}."
        rng.append(({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, rest))
    return {
        "tag": record["tag"],
        "model": model,
        "optimizer": unflatten_optimizer(optimizer_tensors, record["optimizer"]),
        "rng": rng,
        "ema": {k[len("ema."):]: v for k, v in state.items() if k.startswith("ema.")} if record.get("ema") else None,
        "progress": record["progress"],
    }


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
