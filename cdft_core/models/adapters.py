"""The adapters between the backbone and the head: :class:`PooledAdapter` (``none``) and
the Cross-Domain Transfer Module (docs/method.md#cdtm) in its memory-efficient form.

An adapter's ``forward(tokens, pooled)`` maps the backbone's tokens (B×N×C) and pooled
features to the head's input, ``out_dim`` wide.

CDTM: each block mixes the tokens with a matrix chosen per image: a softmax over the cosine
similarity between the image's mean token and K learnable centres weights K learnable
N×N token-mixing matrices. The reference expands the weights to a B×K×N×N tensor and
sums over K (46 MB per image at ViT-B shape); here the same mixture is one matrix
product ``a @ T.reshape(K, N·N)`` that yields B×N×N directly, so time and memory no
longer grow with B·K·N².

Parameter names (stable; checkpoints depend on them), relative to the adapter:
``norm_in``, ``blocks.<i>.norm1``, ``blocks.<i>.centres`` (C×K),
``blocks.<i>.mixing`` (K×N×N), ``blocks.<i>.proj``, ``blocks.<i>.norm2``,
``blocks.<i>.mlp.fc1``, ``blocks.<i>.mlp.fc2``, ``norm_out``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cdft_core.errors import CdftError, UsageError


class PooledAdapter(nn.Module):
    """The ``none`` adapter: pass the backbone's pooled features to the head (no parameters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = int(dim)

    def forward(self, tokens: Tensor | None, pooled: Tensor) -> Tensor:
        return pooled


class Mlp(nn.Module):
    """Linear(C→hidden) → GELU → Linear(hidden→C): the block's second half, without dropout."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CdtmBlock(nn.Module):
    """One CDTM block: per-image token mixing (no residual), then a residual MLP."""

    def __init__(self, dim: int, num_tokens: int, centres: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.num_centres = centres
        self.norm1 = nn.LayerNorm(dim)
        # Standard-normal initialisation of centres and mixing matrices, as in docs/method.md#cdtm.
        self.centres = nn.Parameter(torch.randn(dim, centres))
        self.mixing = nn.Parameter(torch.randn(centres, num_tokens, num_tokens))
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def mixing_weights(self, y: Tensor) -> Tensor:
        """``a`` (B×K): softmax over centres of cos(mean token, centre)."""
        q = F.normalize(y.mean(dim=1), dim=-1)
        c = F.normalize(self.centres, dim=0)
        return torch.softmax(q @ c, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        if n != self.num_tokens:
            raise CdftError(
                f"CDTM was built for {self.num_tokens} tokens but received {n}; "
                f"build the model with the image size the data uses"
            )
        y = self.norm1(x)
        a = self.mixing_weights(y)
        # Σ_k a_bk·T_k as one (B×K)@(K×N²) product: never a B×K×N×N tensor.
        m = (a @ self.mixing.reshape(self.num_centres, n * n)).reshape(b, n, n)
        z = self.drop(self.proj(torch.bmm(m, y)))  # no residual around the mixing
        return z + self.mlp(self.norm2(z))


class Cdtm(nn.Module):
    """``LN_a → L blocks → LN_b → mean over tokens``: maps B×N×C tokens to B×C features.

    ``checkpoint_blocks`` recomputes the first k blocks in the backward pass instead of
    keeping their activations (only while training with gradients enabled).
    """

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        *,
        centres: int = 300,
        blocks: int = 1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        checkpoint_blocks: int = 0,
    ) -> None:
        super().__init__()
        if dim < 1 or num_tokens < 1:
            raise UsageError(f"CDTM needs a positive token dimension and count, got dim={dim}, num_tokens={num_tokens}")
        # upper bounds far past any sensible CDTM (the paper's: 300, 1, 4) keep a typo or a crafted
        # checkpoint from allocating without end
        for label, value, most in (("centres", centres, 100_000), ("blocks", blocks, 64)):
            if int(value) != value or not 1 <= value <= most:
                raise UsageError(f"CDTM option {label} must be an integer from 1 to {most:,}, got {value!r}")
        if not 0 < mlp_ratio <= 64:
            raise UsageError(f"CDTM option mlp_ratio must be in (0, 64], got {mlp_ratio!r}")
        if not 0.0 <= dropout < 1.0:
            raise UsageError(f"CDTM option dropout must be in [0, 1), got {dropout!r}")
        if int(checkpoint_blocks) != checkpoint_blocks or not 0 <= checkpoint_blocks <= blocks:
            raise UsageError(f"CDTM option checkpoint_blocks must be an integer in [0, blocks={blocks}], got {checkpoint_blocks!r}")
        self.dim = dim
        self.out_dim = dim
        self.num_tokens = num_tokens
        self.checkpoint_blocks = int(checkpoint_blocks)
        self.norm_in = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(
            CdtmBlock(dim, num_tokens, int(centres), float(mlp_ratio), float(dropout)) for _ in range(int(blocks))
        )
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, pooled: Tensor | None = None) -> Tensor:
        """``tokens`` B×N×C → B×C; ``pooled`` is accepted for the adapter interface and unused."""
        x = self.norm_in(tokens)
        recompute = self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute and i < self.checkpoint_blocks:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm_out(x).mean(dim=1)
