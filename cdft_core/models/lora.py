"""Low-rank adapters (LoRA) inside a backbone, through the ``peft`` library.

The LoRA strategies (``lora``, ``staged-lora``: plugins/lora_strategies.py) change the
model before any stage labels it: :func:`inject_lora` wraps chosen layers of the
backbone with peft's LoRA layers (``peft.inject_adapter_in_model`` on a plain torch
module — no transformers model needed). peft's layer keeps the original layer as
``base_layer`` and adds ``lora_A``/``lora_B`` under the adapter name ``default``, so a
checkpoint's names are stable and readable::

    backbone.model.blocks.0.attn.qkv.base_layer.weight      (frozen, bit-identical)
    backbone.model.blocks.0.attn.qkv.lora_A.default.weight  (trained)
    backbone.model.blocks.0.attn.qkv.lora_B.default.weight  (trained, starts at zero)

``lora_B`` starts at zero, so the injected model computes exactly what the plain one
does until LoRA trains — which is why ``staged-lora``'s first (frt) stage can run with the
adapters in place and frozen. :func:`merge_lora` folds trained adapters into their base
layers (``W + scale·B·A``) and removes the wrappers, for export.

Default targets (``target_modules="auto"``): every ``nn.Linear`` and 1×1 ``nn.Conv2d`` of
the backbone, and every ``nn.MultiheadAttention`` (open_clip's attention; peft adapts its
input and output projections). That is a timm ViT's ``qkv``, ``proj``, ``fc1``, ``fc2``,
a ConvNeXt's pointwise ``mlp.fc1``/``mlp.fc2`` and a ResNet's 1×1 convolutions; patch
embeddings and depthwise or larger convolutions are left alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from cdft_core.errors import UsageError

#: The optimiser label of LoRA parameters in the LoRA strategies.
LORA_LABEL = "lora"
#: peft's name of the one adapter cdft injects (part of the checkpoint's tensor names).
ADAPTER_NAME = "default"
_LORA_PARAM = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise UsageError("the LoRA strategies need the peft library; install it with `pip install 'cdft[lora]'`") from None
    return peft


def is_lora_parameter(name: str) -> bool:
    """Whether ``name`` (a state-dict name) is a LoRA tensor that :func:`inject_lora` added."""
    return bool(_LORA_PARAM.search(name))


def lora_targets(module: nn.Module, target_modules: str | Sequence[str] | None = "auto") -> list[str]:
    """The full names (inside ``module``) of the layers LoRA adapts.

    ``auto``/None: see the module docstring. Otherwise names or name suffixes, as a list or
    a comma-separated string (``qkv,fc1``); each must match at least one adaptable layer, or
    the error lists some. A suffix (``proj``) selects among the layers ``auto`` would choose
    (linear, 1×1 convolution, attention), so it does not reach a ViT's ``patch_embed.proj``;
    a layer's full name (``patch_embed.proj``) selects any ``nn.Linear``, ``nn.Conv2d`` or
    ``nn.MultiheadAttention``. Full names are returned because peft matches suffixes itself.
    """
    inside_attention = {f"{name}.{child}" for name, m in module.named_modules()
                        if isinstance(m, nn.MultiheadAttention) for child, _ in m.named_modules() if child}
    layers = {name: m for name, m in module.named_modules()
              if name and name not in inside_attention and isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention))}
    pointwise = [name for name, m in layers.items()
                 if not isinstance(m, nn.Conv2d) or (tuple(m.kernel_size) == (1, 1) and m.groups == 1)]
    if target_modules is None or target_modules == "auto":
        chosen = pointwise
        if not chosen:
            raise UsageError("LoRA found no linear, 1x1 convolution or attention layer in the backbone; "
                             "name the layers with --strategy-option target_modules=NAME,NAME")
        return chosen
    wanted = [t.strip() for t in target_modules.split(",")] if isinstance(target_modules, str) else [
        str(t).strip() for t in target_modules]
    wanted = [t for t in wanted if t]
    if not wanted:
        raise UsageError("strategy option target_modules is empty; give layer names such as qkv,fc1 or auto")
    chosen = []
    for target in wanted:
        # a suffix reaches the layers auto would (so `proj` is not a ViT's patch_embed.proj);
        # a full name reaches any adaptable layer, a patch embedding or a 3x3 convolution too
        matches = [name for name in layers if name == target] or [
            name for name in pointwise if name.endswith("." + target)]
        if not matches:
            examples = sorted({name.rsplit(".", 1)[-1] for name in layers})[:8]
            raise UsageError(f"strategy option target_modules: {target!r} matches no linear, convolution or attention "
                             f"layer of the backbone; its layers end in e.g. {', '.join(examples)}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def inject_lora(model: Any, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                target_modules: str | Sequence[str] | None = "auto") -> str:
    """Wrap the backbone's target layers of ``model`` (a CdftModel) with LoRA, in place.

    Deterministic given torch's RNG state (``lora_A`` is drawn from it), so every DDP rank
    and every rebuild from a checkpoint's spec get the same layout. Returns a line for the
    run's log: how many layers, and how many LoRA parameters against the backbone's.
    """
    peft = _peft()
    backbone = model.backbone
    inner = getattr(backbone, "model", backbone)
    targets = lora_targets(inner, target_modules)
    config = peft.LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                             target_modules=targets, bias="none")
    base = sum(p.numel() for p in inner.parameters())
    peft.inject_adapter_in_model(config, inner, adapter_name=ADAPTER_NAME)
    added = sum(p.numel() for name, p in inner.named_parameters() if is_lora_parameter("." + name))
    return (f"LoRA in {len(targets)} layer{'s' if len(targets) != 1 else ''} (rank {int(rank)}, alpha {float(alpha):g}, dropout {float(dropout):g}): "
            f"{added:,} LoRA parameters, {100 * added / max(base, 1):.2f}% of the backbone's {base:,}")


def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA layer under ``module`` into its base layer and unwrap it, in place.

    The result has the plain model's layers and tensor names and computes the same
    function (up to float rounding), without peft at inference time. Returns the number of
    layers merged.
    """
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, child in list(module.named_children()):
        if isinstance(child, LoraLayer):
            if not child.merged:  # an attention wrapper's merge has already folded its out_proj
                child.merge(adapter_names=[ADAPTER_NAME])
            child = child.get_base_layer()
            setattr(module, name, child)
            merged += 1
        merged += merge_lora(child)  # attention wrappers hold their adapted out_proj inside
    return merged


_LORA_TENSOR = re.compile(rf"^(?P<layer>.+)\.lora_(?P<part>A|B)\.{ADAPTER_NAME}\.weight$")


def merge_lora_tensors(state_dict: dict[str, Any], alpha: float | None, source: str) -> dict[str, Any]:
    """A LoRA run's state dict with each adapter folded into its base layer (``W + α/r·B·A``).

    Why: a LoRA checkpoint given as ``--weights`` should start a run (or load a backbone)
    from the fine-tuned weights, under the plain model's tensor names. ``alpha`` comes from
    the checkpoint's recorded strategy options; without it (a file not written by cdft)
    the scale is unknown and the file is refused, as is a layer whose LoRA is not a plain
    Linear or 1×1 convolution adapter (open_clip's attention). Returns ``state_dict``
    itself when it holds no LoRA tensor.
    """
    if not any(is_lora_parameter("." + key) for key in state_dict):
        return state_dict
    fix = "merge the adapters into the base weights (peft's merge_and_unload) and save a plain state dict"
    if alpha is None:
        raise UsageError(f"weights file {source!r} holds LoRA adapters (lora_A/lora_B) but not their alpha; {fix}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise UsageError(f"weights file {source!r} records LoRA alpha {alpha!r}, not a positive number; {fix}")
    merged = {k: v for k, v in state_dict.items() if not is_lora_parameter("." + k)}
    parts: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        match = _LORA_TENSOR.match(key)
        if match is None and is_lora_parameter("." + key):
            raise UsageError(f"weights file {source!r} holds a LoRA tensor cdft cannot merge ({key}); {fix}")
        if match is not None:
            parts.setdefault(match["layer"], {})[match["part"]] = value
    for layer, pair in parts.items():
        base = merged.pop(f"{layer}.base_layer.weight", None)
        if (base is None or set(pair) != {"A", "B"} or base.dim() not in (2, 4)
                or pair["A"].dim() < 2 or pair["B"].dim() < 2 or 0 in (*pair["A"].shape, *pair["B"].shape)):
            raise UsageError(f"weights file {source!r} holds a LoRA layer cdft cannot merge ({layer}); {fix}")
        down, up = pair["A"].flatten(1).float(), pair["B"].flatten(1).float()
        if up.shape[1] != down.shape[0] or up.shape[0] * down.shape[1] != base.numel():
            raise UsageError(f"weights file {source!r} holds a LoRA layer whose shapes do not fit its base layer "
                             f"({layer}: B {tuple(pair['B'].shape)}, A {tuple(pair['A'].shape)}, base "
                             f"{tuple(base.shape)}); {fix}")
        delta = (up @ down) * (float(alpha) / down.shape[0])
        merged[f"{layer}.weight"] = (base.float() + delta.reshape(base.shape)).to(base.dtype)
        bias = merged.pop(f"{layer}.base_layer.bias", None)
        if bias is not None:
            merged[f"{layer}.bias"] = bias
    leftover = [k for k in merged if ".base_layer." in k]
    if leftover:
        raise UsageError(f"weights file {source!r} holds a LoRA layer cdft cannot merge ({leftover[0]}); {fix}")
    return merged
