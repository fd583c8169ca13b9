"""Backbones named ``hf-hub:ORG/NAME[@REV]``: a timm model described by its hub repo's ``config.json``.

timm publishes (and anyone may publish) a model as a hub repo holding ``config.json``
(``architecture``, ``model_args``, ``pretrained_cfg``, ``num_classes``) beside
``model.safetensors`` or ``pytorch_model.bin``. timm's own ``create_model("hf-hub:...")``
downloads the config unbounded, loads the weights leniently and fails with the hub
client's traceback; cdft resolves the same names with its own rules:

1. the hub, when it is reachable and ``HF_HUB_OFFLINE`` is unset (``hf_hub_download``
   revalidates the cached copy and records the snapshot);
2. otherwise (or when the hub refuses or fails) the local Hugging Face cache, without
   any network access;
3. otherwise one line naming the repo, the cache directory, how to fill it and the
   ``--weights`` alternative; for a gated repo (the hub answers 401/403, or a curated
   row says so) the line says to accept the licence and set ``HF_TOKEN``.

``config.json`` is read bounded (:data:`MAX_CONFIG_BYTES`) and parsed as JSON only; it is
interpreted as timm's ``_parse_model_cfg`` does. The weights are then taken from the same
snapshot (:attr:`HubConfig.weights_repo`), so a config and its weights never come from two
revisions. A result is remembered per process, cache directory and offline switch, so
resolving a name several times (``cdft run`` does) asks the hub once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cdft_core.errors import UsageError
from cdft_core.models.foundation_table import FOUNDATION_MODELS
from cdft_core.models.weights import (
    gated_note,
    hf_cache_dir,
    http_status,
    hub_endpoint,
    hub_offline,
    hub_reachable,
    offline_reason,
)
from cdft_core.text import one_line

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"
#: A timm config.json is a few kB; anything far bigger is not one (and is not read into memory).
MAX_CONFIG_BYTES = 1 << 20
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"^{_PART}/{_PART}$")
_MEMO: dict[tuple[str, str, bool, str], HubConfig] = {}


@dataclass(frozen=True)
class HubConfig:
    """What a hub repo's ``config.json`` says, and where it was read."""

    name: str  # the backbone name, ``hf-hub:ORG/NAME[@REV]``
    repo_id: str
    revision: str | None
    architecture: str  # a timm architecture name
    model_args: Mapping[str, Any]  # extra ``timm.create_model`` arguments
    pretrained_cfg: Mapping[str, Any]  # timm PretrainedCfg fields: mean, std, input_size...
    path: str  # the local config.json
    origin: str  # "hub" (fetched or revalidated now) or "cache" (offline copy)
    gated: bool

    @property
    def snapshot(self) -> str | None:
        """The commit folder the config was read from (``snapshots/<commit>/config.json``)."""
        parent = Path(self.path).parent
        return parent.name if parent.parent.name == "snapshots" else None

    @property
    def weights_repo(self) -> str:
        """``repo@commit`` of the config's snapshot, so weights come from the same revision."""
        pin = self.snapshot or self.revision
        return f"{self.repo_id}@{pin}" if pin else self.repo_id

    def describe(self) -> str:
        return f"{self.origin}: {self.path}"

    def weights_status(self) -> str:
        """Where pretrained weights would come from, without downloading anything (``cdft show``)."""
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, pin = self.weights_repo.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir(), revision=pin or None)
            if isinstance(cached, str) and os.path.isfile(cached):
                return f"cache: {cached}"
        if hub_offline():
            return (f"not in the cache, and {offline_reason()}: {download_hint(self.repo_id, self.revision)}, "
                    f"or pass --weights FILE")
        return f"hub: {self.repo_id} (downloaded into the cache at {hf_cache_dir()} when first built)"


def is_hub_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def split_hub_name(name: str) -> tuple[str, str | None]:
    """``hf-hub:ORG/NAME@REV`` -> (``ORG/NAME``, ``REV``); a malformed name is a usage error."""
    repo_id, at, revision = name[len(HUB_PREFIX):].partition("@")
    if not _REPO_RE.match(repo_id) or "--" in repo_id or ".." in repo_id or (at and not revision.strip()):
        raise UsageError(
            f"{name!r} is not a hub model name; write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION "
            f"(e.g. hf-hub:timm/vit_small_patch16_224.augreg_in21k)"
        )
    return repo_id, revision or None


def curated_row(repo_id: str) -> str | None:
    """The curated foundation row (``uni``...) whose hub repo is ``repo_id``, if any (case as the hub: ignored)."""
    return next((n for n, row in FOUNDATION_MODELS.items() if row.hub.lower() == repo_id.lower()), None)


def download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"on a connected machine run `huggingface-cli download {repo_id}{rev}` (or `hf download`) "
        f"and copy ~/.cache/huggingface/hub to {hf_cache_dir()}"
    )


def missing_repo_message(name: str, repo_id: str, revision: str | None, reason: str, *, gated: bool) -> str:
    """The one line for a hub name whose config.json neither the hub nor the cache gives."""
    text = (
        f"backbone {name!r}: hub repo {repo_id} is not in the local Hugging Face cache at {hf_cache_dir()} "
        f"({reason}); {download_hint(repo_id, revision)}, or pass the timm architecture with the weights file "
        f"(--backbone ARCH --weights FILE)"
    )
    return f"{text}; {gated_note(repo_id)}" if gated else text


def hub_config(name: str) -> HubConfig:
    """The parsed ``config.json`` of hub name ``name``: from the hub when reachable, else the cache."""
    repo_id, revision = split_hub_name(name)
    key = (name, hf_cache_dir(), hub_offline(), hub_endpoint())
    if key not in _MEMO:
        row = curated_row(repo_id)
        gated = bool(row and FOUNDATION_MODELS[row].gated)
        path, origin, gated = _locate_config(name, repo_id, revision, gated)
        architecture, model_args, pretrained_cfg = parse_config(read_config(path, name), name, path)
        pretrained_cfg.update(hf_hub_id=repo_id, source="hf-hub", architecture=architecture)
        _MEMO[key] = HubConfig(name, repo_id, revision, architecture, model_args, pretrained_cfg, path, origin, gated)
    return _MEMO[key]


def recorded_config(hub: HubConfig) -> dict[str, Any]:
    """What a checkpoint's model spec keeps of ``hub`` (JSON): enough to rebuild the architecture."""
    from cdft_core.text import jsonable

    return jsonable({"architecture": hub.architecture, "model_args": dict(hub.model_args),
                     "pretrained_cfg": dict(hub.pretrained_cfg), "snapshot": hub.snapshot})


def remember_recorded(name: str, recorded: Mapping[str, Any]) -> None:
    """Use a checkpoint's recorded config for ``name`` in this process, instead of the hub's or the cache's.

    A checkpoint is evaluated (``cdft eval``, ``predict``, ``export``...) on machines that may
    have neither the hub nor the repo in their cache; and the repo's config.json may have
    changed since. The architecture the tensors were trained in is the recorded one.
    """
    repo_id, revision = split_hub_name(name)
    architecture, model_args, pretrained_cfg = parse_config(
        {"architecture": recorded.get("architecture"), "model_args": recorded.get("model_args") or {},
         "pretrained_cfg": recorded.get("pretrained_cfg") or {}}, name, "the checkpoint's model spec")
    pretrained_cfg.update({k: v for k, v in (recorded.get("pretrained_cfg") or {}).items()
                           if k in ("hf_hub_id", "source", "architecture")})
    path = "(recorded in the checkpoint)"
    if recorded.get("snapshot"):
        path = f"snapshots/{recorded['snapshot']}/{CONFIG_FILE} (recorded in the checkpoint)"
    key = (name, hf_cache_dir(), hub_offline(), hub_endpoint())
    _MEMO[key] = HubConfig(name, repo_id, revision, architecture, model_args, pretrained_cfg, path, "checkpoint",
                           gated=False)


def _locate_config(name: str, repo_id: str, revision: str | None, gated: bool) -> tuple[str, str, bool]:
    """(local path, "hub" or "cache", gated) of the repo's config.json, or the one-line error."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hf_cache_dir()
    if hub_offline():
        reason = offline_reason()
    elif not hub_reachable():
        reason = f"the hub {hub_endpoint()} is unreachable"
    else:
        try:
            return hf_hub_download(repo_id, CONFIG_FILE, revision=revision, cache_dir=cache), "hub", gated
        except GatedRepoError:
            gated, reason = True, "the hub refused access: the repo is gated"
        except RepositoryNotFoundError as exc:  # the hub says 401 for private and missing repos alike
            gated = gated or http_status(exc) in (401, 403)
            reason = "the hub has no such repo, or it is private or gated and HF_TOKEN does not grant access"
        except RevisionNotFoundError:
            reason = f"the hub repo has no revision {revision!r}"
        except LocalEntryNotFoundError as exc:  # the network failed part-way
            reason = f"download failed: {one_line(exc)}"
        except EntryNotFoundError:
            raise UsageError(
                f"backbone {name!r}: hub repo {repo_id} has no {CONFIG_FILE}, so it is not a timm model repo; "
                f"pass its timm architecture as --backbone with --weights FILE"
            ) from None
        except OSError as exc:  # HfHubHTTPError and connection errors
            gated = gated or http_status(exc) in (401, 403)
            reason = f"download failed: {one_line(exc)}"
    cached = try_to_load_from_cache(repo_id, CONFIG_FILE, cache_dir=cache, revision=revision)
    if isinstance(cached, str) and os.path.isfile(cached):
        return cached, "cache", gated
    raise UsageError(missing_repo_message(name, repo_id, revision, reason, gated=gated))


def read_config(path: str, name: str) -> dict[str, Any]:
    """``config.json`` as a dict: at most :data:`MAX_CONFIG_BYTES`, JSON only, else one line."""
    what = f"{CONFIG_FILE} of backbone {name!r} ({path})"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what}: {one_line(exc)}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"{what} is larger than {MAX_CONFIG_BYTES} bytes, so it is not a timm model config")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{what} is not valid JSON ({type(exc).__name__}: {one_line(exc)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} holds a JSON {type(data).__name__}, not an object; it is not a timm model config")
    return data


def parse_config(data: Mapping[str, Any], name: str, path: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(architecture, model_args, pretrained_cfg) as timm's ``_parse_model_cfg`` reads them.

    Both layouts are accepted: ``{"architecture", "model_args", "pretrained_cfg", ...}`` and
    the legacy single dict. The architecture must be one this timm knows; pretrained_cfg
    keys timm's ``PretrainedCfg`` does not have are dropped (a newer timm wrote them).
    """
    import timm
    from timm.models import PretrainedCfg

    what = f"{CONFIG_FILE} of backbone {name!r} ({path})"
    data = dict(data)
    if "pretrained_cfg" in data:
        cfg, model_args = data.get("pretrained_cfg"), data.get("model_args") or {}
    else:  # legacy: one dict holding the pretrained cfg and the architecture
        cfg, model_args = {k: v for k, v in data.items() if k not in ("num_features",)}, {}
    if not isinstance(cfg, dict) or not isinstance(model_args, dict):
        raise UsageError(f"{what}: pretrained_cfg and model_args must be JSON objects; it is not a timm model config")
    cfg = dict(cfg)
    architecture = data.get("architecture", cfg.pop("architecture", None))
    cfg.pop("architecture", None)
    if not isinstance(architecture, str) or not architecture:
        raise UsageError(f"{what} names no architecture; it is not a timm model config")
    if not timm.is_model(architecture):
        raise UsageError(
            f"{what} names architecture {architecture!r}, which timm {timm.__version__} does not have; "
            f"upgrade timm, or pick a backbone from `cdft list backbones --all`"
        )
    if "labels" in cfg:
        cfg["label_names"] = cfg.pop("labels")
    for key in ("num_classes", "label_names", "label_descriptions"):
        if key in data:
            cfg[key] = data[key]
    if model_args.get("dynamic_img_size") or model_args.get("strict_img_size") is False:
        cfg["fixed_input_size"] = False
    known = {f.name for f in fields(PretrainedCfg)}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in known}
    for key in ("input_size", "mean", "std"):
        if key in cfg and not _numbers(cfg[key]):
            raise UsageError(f"{what}: pretrained_cfg {key} must be a list of numbers, got {cfg[key]!r}")
    size = model_args.get("img_size")
    if isinstance(size, int) and cfg.get("fixed_input_size") and "input_size" in cfg:
        cfg["input_size"] = (cfg["input_size"][0], size, size)
    return architecture, dict(model_args), cfg


def _numbers(value: Any) -> bool:
    return isinstance(value, tuple) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
