"""Built-in plugin: the adapters between backbone and head, ``none`` and ``cdtm``.

An adapter factory is ``factory(*, dim, num_tokens, pooled_dim, **options) -> nn.Module``
with ``out_dim``; its ``forward(tokens, pooled)`` returns the head's input. The metadata
says whether it reads the tokens (``uses_tokens``), whether it has trainable parameters
(``has_parameters``: strategies that train only the adapter need one) and its options
with their defaults (``options``: ``--adapter-option KEY=VALUE`` is checked against them).
"""

from __future__ import annotations

from typing import Any

from cdft_core import UsageError, hookimpl

#: CDTM options (docs/method.md#cdtm names: K = centres, L = blocks, r = mlp_ratio) and defaults.
CDTM_OPTIONS: dict[str, Any] = {
    "centres": 300,
    "blocks": 1,
    "mlp_ratio": 4.0,
    "dropout": 0.0,
    "checkpoint_blocks": 0,
}


def build_none(*, dim: int, num_tokens: int, pooled_dim: int | None = None, **options: Any) -> Any:
    from cdft_core import PooledAdapter

    if options:
        raise UsageError(f"adapter 'none' takes no options, got {', '.join(sorted(options))}")
    return PooledAdapter(pooled_dim or dim)


def build_cdtm(*, dim: int, num_tokens: int, pooled_dim: int | None = None, **options: Any) -> Any:
    from cdft_core import Cdtm

    unknown = sorted(set(options) - set(CDTM_OPTIONS))
    if unknown:
        raise UsageError(f"adapter 'cdtm' has no option {', '.join(unknown)}; its options: {', '.join(CDTM_OPTIONS)}")
    return Cdtm(dim, num_tokens, **options)


@hookimpl
def register_adapters(register):
    register(
        "none",
        build_none,
        description="no adapter: the backbone's pooled features (ViT class token, ConvNeXt pooled map) feed the head",
        metadata={"uses_tokens": False, "has_parameters": False, "options": {}},
    )
    register(
        "cdtm",
        build_cdtm,
        description="Cross-Domain Transfer Module: per-image token mixing and a residual MLP over the backbone tokens",
        metadata={"uses_tokens": True, "has_parameters": True, "options": dict(CDTM_OPTIONS)},
    )
