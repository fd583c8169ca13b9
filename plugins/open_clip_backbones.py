"""Built-in plugin (extra ``cdft[open_clip]``): open_clip image towers whose trunk is a timm model.

The paper's ConvNeXt-B LAION-400M row exists only in open_clip (model ``convnext_base``,
pretrained tag ``laion400m_s13b_b51k``). Its visual tower wraps a timm ConvNeXt
("trunk") followed by a projection to the text space; cdft keeps the trunk, with
open_clip's mean/std, and drops the projection (our head replaces it).

Names: ``open_clip:<model>.<tag>`` (canonical) and the seed's spelling ``<model> <tag>``.
Without open_clip installed the plugin reports itself *unavailable* (not broken).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from functools import partial
from typing import Any

from cdft_core import Lazy, PluginUnavailable, UsageError, hookimpl

PREFIX = "open_clip:"
INSTALL_HINT = "open_clip is not installed; pip install 'cdft[open_clip]'"

#: (open_clip model, pretrained tag) -> (family, pretraining source, description)
PAPER_ROWS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("convnext_base", "laion400m_s13b_b51k"): (
        "convnext", "LAION-400M (CLIP)", "ConvNeXt-B CLIP image trunk trained on LAION-400M (open_clip)",
    ),
}

_CANONICAL = re.compile(r"^open_clip:(?P<model>[^.\s]+)\.(?P<tag>\S+)$")
_SEED = re.compile(r"^(?P<model>\S+)\s+(?P<tag>\S+)$")


def canonical_name(model: str, tag: str) -> str:
    return f"{PREFIX}{model}.{tag}"


def parse_name(name: str) -> tuple[str, str] | None:
    """``open_clip:convnext_base.laion400m_s13b_b51k`` or ``convnext_base laion400m_s13b_b51k``."""
    match = _CANONICAL.match(name.strip()) or _SEED.match(name.strip())
    return (match["model"], match["tag"]) if match else None


def _timm_trunk_name(model: str) -> str | None:
    import open_clip

    config = open_clip.get_model_config(model) or {}
    return (config.get("vision_cfg") or {}).get("timm_model_name")


def timm_trunk_pairs() -> list[tuple[str, str]]:
    """open_clip (model, tag) pairs whose image tower is a timm trunk."""
    import open_clip

    return [(m, t) for m, t in open_clip.list_pretrained() if _timm_trunk_name(m)]


def data_config(model: str, tag: str, image_size: int | None = None, note: str = "") -> dict[str, Any]:
    """open_clip's preprocessing for (model, tag), read from its tables without building anything."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise UsageError(f"open_clip has no pretrained tag {tag!r} for model {model!r}")
    vision = (open_clip.get_model_config(model) or {}).get("vision_cfg") or {}
    default_size = vision.get("image_size", 224)
    size = int(image_size or (default_size if isinstance(default_size, int) else default_size[0]))
    source = f"open_clip pretrained cfg {model}/{tag}" + (f" ({note})" if note else "")
    return {
        "input_size": (3, size, size),
        "mean": tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": str(cfg.get("interpolation", "bicubic")),
        "source": source,
    }


@contextlib.contextmanager
def _quiet_random_init():
    """open_clip logs a root-logger warning for random init, which is what we ask for here."""

    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def build(
    model: str,
    tag: str,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    image_size: int | None = None,
    grad_checkpointing: bool = False,
) -> Any:
    """The backbone factory: the visual trunk of open_clip ``model``, weights of ``tag``."""
    import open_clip

    from cdft_core import (
        TimmBackbone,
        hub_filenames,
        load_backbone_weights,
        read_state_dict,
        resolve_hub_file,
        timm_family,
    )

    name = canonical_name(model, tag)
    trunk_name = _timm_trunk_name(model)
    if trunk_name is None:
        raise UsageError(f"open_clip model {model!r} has no timm trunk; cdft supports open_clip towers built on timm")
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise UsageError(f"open_clip has no pretrained tag {tag!r} for model {model!r}")
    # Find the weights before building anything: a missing file fails in a second.
    state_dict = None
    if weights:
        state_dict = read_state_dict(weights)
        note, source, origin = f"assumed for weights from file {weights}", f"file:{weights}", f"file {weights}"
    elif pretrained:
        hub = cfg.get("hf_hub", "")
        if not hub:
            raise UsageError(f"open_clip lists no hub repo for {name!r}; pass --weights PATH or use --no-pretrained")
        # open_clip spells hub entries 'org/repo/' (default file) or 'org/repo/file.bin'
        repo, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        path = resolve_hub_file(name, repo, hub_filenames(filename or "open_clip_pytorch_model.bin"))
        state_dict = read_state_dict(path)
        note, source, origin = "", f"hub:{repo}", f"hub:{repo} ({path})"
    else:
        note, source, origin = "random init", "random init", ""
    config = data_config(model, tag, image_size, note)

    with _quiet_random_init():
        clip = open_clip.create_model(model, pretrained=None)
    trunk = clip.visual.trunk
    del clip  # the text tower and the projection are not used
    backbone = TimmBackbone(
        trunk, name=name, family=timm_family(trunk_name), image_size=config["input_size"][-1],
        data_config=config, weights=source,
    )
    if state_dict is not None:
        backbone.load_report = load_backbone_weights(trunk, state_dict, name=name, source=origin)
    if grad_checkpointing:
        trunk.set_grad_checkpointing(True)
    return backbone


def _metadata(model: str, tag: str, family: str, pretraining: str) -> dict[str, Any]:
    return {
        "family": family,
        "pretraining": pretraining,
        "source": "open_clip",
        "open_clip_model": model,
        "open_clip_tag": tag,
        "data_config": Lazy(partial(data_config, model, tag)),
    }


def claim(name: str) -> dict[str, Any] | None:
    parsed = parse_name(name)
    if parsed is None:
        return None
    model, tag = parsed
    if (model, tag) in PAPER_ROWS:
        family, pretraining, description = PAPER_ROWS[(model, tag)]
    else:
        import open_clip

        if (model, tag) not in set(open_clip.list_pretrained()):
            if name.startswith(PREFIX):
                raise UsageError(f"open_clip has no pretrained model {model!r} with tag {tag!r}; see `cdft list backbones 'open_clip:*' --all`")
            return None  # a two-word name that is not an open_clip pair: not ours
        trunk = _timm_trunk_name(model)
        if trunk is None:
            raise UsageError(f"open_clip model {model!r} has no timm trunk; cdft supports open_clip towers built on timm")
        from cdft_core import timm_family

        family, pretraining, description = timm_family(trunk), f"open_clip tag {tag}", f"open_clip {model} {tag} (timm trunk {trunk})"
    return {
        "name": canonical_name(model, tag),
        "factory": partial(build, model, tag),
        "description": description,
        "metadata": _metadata(model, tag, family, pretraining),
    }


def catalogue() -> list[str]:
    return [canonical_name(m, t) for m, t in timm_trunk_pairs()]


@hookimpl
def register_backbones(register):
    if importlib.util.find_spec("open_clip") is None:
        raise PluginUnavailable(INSTALL_HINT)
    for (model, tag), (family, pretraining, description) in PAPER_ROWS.items():
        register(
            canonical_name(model, tag),
            partial(build, model, tag),
            description=description,
            metadata={**_metadata(model, tag, family, pretraining), "paper": True},
        )
    register.resolver(claim, catalogue=catalogue, description="an open_clip image tower with a timm trunk")
