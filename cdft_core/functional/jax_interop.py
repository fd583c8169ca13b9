"""Hand parameter trees to JAX and back through DLPack, without copying where possible.

``to_jax(tree)`` turns every tensor leaf of a (nested or flat) tree into a ``jax.Array``
and ``from_jax(tree)`` does the reverse; names, nesting, shapes, dtypes (``bfloat16``
included) and values are preserved and ``None`` holes stay holes. With the tensors on a
device JAX can address (CPU here; a GPU when jaxlib has CUDA support) the arrays share the
tensors' memory: a 300 M-parameter backbone crosses over for free. Otherwise the leaf is
copied through host memory, which is still correct, only slower.

Shared memory has the usual consequence: a JAX array is meant to be immutable, so do not
modify the torch tensor in place while its JAX view is in use (pass ``copy=True`` to get
independent arrays). Parameters are detached first, since DLPack cannot carry autograd.

64-bit leaves (``float64``, ``int64``) need JAX's 64-bit mode; without it JAX would
silently turn them into 32-bit copies, so they are refused with the fix in the message.

``jax`` is an optional dependency (``pip install 'cdft[jax]'``) and is imported only here,
inside the functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cdft_core.errors import CdftError, UsageError
from cdft_core.functional import pytree
from cdft_core.functional.pytree import Tree

if TYPE_CHECKING:
    import torch

_INSTALL = "JAX interop needs jax: pip install 'cdft[jax]'"


def _jax():
    try:
        import jax
        import jax.dlpack  # noqa: F401  (submodule used below)
    except ImportError as exc:
        raise CdftError(_INSTALL) from exc
    return jax


def to_jax(tree: Tree, *, copy: bool = False) -> dict[str, Any]:
    """The tree with every tensor leaf as a ``jax.Array`` (zero-copy unless ``copy``)."""
    jax = _jax()
    x64 = _x64_enabled(jax)
    out = {}
    for name, leaf in pytree.flatten(tree).items():
        out[name] = None if leaf is None else _tensor_to_jax(jax, name, leaf, copy=copy, x64=x64)
    return pytree.spelled_like(tree, out)


def from_jax(tree: Tree, *, copy: bool = False) -> dict[str, Any]:
    """The tree with every ``jax.Array`` leaf as a ``torch.Tensor`` (zero-copy unless ``copy``)."""
    import torch

    _jax()
    out = {}
    for name, leaf in pytree.flatten(tree).items():
        if leaf is None:
            out[name] = None
            continue
        tensor = torch.from_dlpack(leaf)
        out[name] = tensor.clone() if copy else tensor
    return pytree.spelled_like(tree, out)


def _tensor_to_jax(jax, name: str, tensor: torch.Tensor, *, copy: bool, x64: bool):
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_jax: leaf {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    if tensor.dtype in (torch.float64, torch.int64, torch.complex128) and not x64:
        raise UsageError(
            f"leaf {name!r} is {tensor.dtype} but JAX's 64-bit mode is off (it would become 32-bit); "
            f"run jax.config.update('jax_enable_x64', True) first, or cast the tensor"
        )
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    if copy:
        tensor = tensor.clone()
    try:
        return jax.dlpack.from_dlpack(tensor)
    except Exception:
        if tensor.device.type == "cpu":
            raise
        # JAX cannot address this device (e.g. a CPU-only jaxlib with CUDA tensors):
        # go through host memory instead.
        return jax.dlpack.from_dlpack(tensor.cpu())


def _x64_enabled(jax) -> bool:
    import numpy as np

    return jax.dtypes.canonicalize_dtype(np.int64) == np.dtype(np.int64)
