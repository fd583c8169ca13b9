"""Where backbone weights come from: the Hugging Face cache, the hub, or a file the user names.

Many hospital clusters (and our CI) cannot reach the hub. The rules are:

1. A file already in the local Hugging Face cache is used without any network access.
2. Otherwise, with ``HF_HUB_OFFLINE=1``, or when the hub's host does not answer within a
   few seconds, loading stops with one line naming the model, the cache directory and
   ``--weights`` — never a long network time-out or a traceback.
3. Otherwise the file is downloaded into the cache.
4. ``--weights PATH`` (safetensors, or a torch state dict read with ``weights_only=True``)
   bypasses all of this.

Every backbone builder (timm names, ``hf-hub:`` names, curated foundation rows) makes this
file / hub / random choice through one helper, :func:`weight_source`.

The environment (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT``) is
read on every call, not when a library is imported, so a test or a launcher that sets it
late is still obeyed. Loading a state dict into a module goes through
:func:`load_state_dict_checked`, which turns shape mismatches, missing keys and keys the
model lacks (other than a pretrained classifier) into one clear
:class:`~cdft_core.errors.CdftError` line.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from cdft_core.errors import CdftError, UsageError
from cdft_core.text import TRUE_WORDS, one_line

if TYPE_CHECKING:
    from torch import Tensor, nn

#: Seconds to wait for the hub's host before declaring it unreachable.
PROBE_TIMEOUT_S = 3.0

#: Wrappers that training scripts put around a state dict.
_CONTAINER_KEYS = ("state_dict", "model", "module", "model_state_dict")


def _truthy(value: str | None) -> bool:
    """Hugging Face's own switches: anything but a true word is off (their rule, not ours)."""
    return (value or "").strip().lower() in TRUE_WORDS


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def offline_reason() -> str:
    """Which offline switch is on, for error lines (``HF_HUB_OFFLINE is set``)."""
    names = [n for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _truthy(os.environ.get(n))]
    return f"{' and '.join(names) or 'HF_HUB_OFFLINE'} is set"


def hf_cache_dir() -> str:
    """The Hugging Face hub cache directory, from the environment as it is now."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(os.path.expandvars(explicit))
    home = os.environ.get("HF_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return os.path.join(os.path.expanduser(os.path.expandvars(home)), "hub")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to the hub's host, bounded by ``timeout`` seconds in all.

    A firewall that drops packets, or a DNS server that never answers, costs ``timeout``
    rather than the minutes of the HTTP client's retries. The probe runs in a daemon
    thread because name resolution ignores socket time-outs.
    """
    url = urlparse(hub_endpoint())
    host = url.hostname
    if not host:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="cdft-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def split_revision(repo: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``), the hub-id spelling timm uses."""
    repo_id, _, revision = repo.partition("@")
    return repo_id, revision or None


def gated_note(repo_id: str) -> str:
    """The fix for a gated repo, in the words every message uses (tests and docs match it)."""
    return f"{repo_id} is gated: accept its licence at {hub_endpoint()}/{repo_id} and set HF_TOKEN"


def missing_weights_message(model: str, repo_id: str, reason: str, *, gated: bool = False,
                            revision: str | None = None) -> str:
    """The one line of weights neither the cache nor the hub gives; ``revision``: the snapshot they must come from."""
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    text = (
        f"no pretrained weights for backbone {model!r} in the Hugging Face cache {hf_cache_dir()} "
        f"({reason}); on a connected machine run `{download}` and copy the cache, "
        f"or pass --weights PATH (safetensors or state dict), or use --no-pretrained"
    )
    return f"{text}; {gated_note(repo_id)}" if gated else text


def resolve_hub_file(model: str, repo: str, filenames: Iterable[str], *, gated: bool = False) -> str:
    """The local path of the first of ``filenames`` in hub repo ``repo``: cached, else downloaded.

    Raises a one-line :class:`CdftError` when offline (or the hub is unreachable) and no
    candidate is cached. ``model`` is the cdft backbone name, used in messages only. A repo
    known to be ``gated`` (or that the hub refuses with 401/403) adds the licence and
    ``HF_TOKEN`` fix to the message.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = split_revision(repo)
    cache_dir = hf_cache_dir()
    names = list(filenames)
    for filename in names:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    if hub_offline():
        raise CdftError(missing_weights_message(model, repo_id, offline_reason(), gated=gated,
                                                revision=revision))
    if not hub_reachable():
        raise CdftError(missing_weights_message(model, repo_id, f"the hub {hub_endpoint()} is unreachable", gated=gated,
                                                revision=revision))
    last_error: Exception | None = None
    for filename in names:
        try:
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
        except LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: the network failed
            reason = f"download failed: {one_line(exc)}"
            raise CdftError(missing_weights_message(model, repo_id, reason, gated=gated, revision=revision)) from exc
        except EntryNotFoundError as exc:  # the repo lacks this file: try the next spelling
            last_error = exc
        except (HfHubHTTPError, OSError) as exc:
            refused = isinstance(exc, GatedRepoError) or http_status(exc) in (401, 403)
            reason = f"download failed: {one_line(exc)}"
            raise CdftError(missing_weights_message(model, repo_id, reason, gated=gated or refused)) from exc
    raise CdftError(
        f"hub repo {repo_id} has none of {', '.join(names)} for backbone {model!r}: {one_line(last_error)}; "
        f"pass --weights PATH or use --no-pretrained"
    )


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a hub error, if it carries a response (401/403: private or gated)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's weights come from: the one choice every builder makes the same way.

    ``source`` is what ``backbone.weights`` records (``file:PATH``, ``hub:REPO``,
    ``url:URL``, ``random init``); ``origin`` names the file in the load report;
    ``note`` is what the data config's ``source`` adds (the preprocessing is *assumed*
    for a bare file, and says ``random init`` without weights).
    """

    kind: str  # "file", "hub", "url" or "random"
    source: str
    origin: str
    path: str | None
    note: str
    preread: Mapping[str, Any] | None = None

    def state_dict(self) -> dict[str, Tensor] | None:
        """The tensors to load (None for random init); a ``--weights`` file was read already."""
        if self.preread is not None:
            return dict(self.preread)
        return read_state_dict(self.path) if self.path else None


def weight_source(
    model: str, *, pretrained: bool, weights: str | None, locate: Callable[[], tuple[str, str]]
) -> WeightSource:
    """Choose the weights of backbone ``model``: ``--weights`` file, else pretrained (``locate``), else none.

    ``locate()`` returns (local path, ``hub:<repo>`` or ``url:<url>``) and raises the
    one-line error of a missing file; it runs only when pretrained weights are wanted. A
    ``--weights`` file is read here, before any model is built, so a bad file fails in a
    second rather than after a large build.
    """
    if weights:
        return WeightSource(
            "file", f"file:{weights}", f"file {weights}", str(weights),
            f"assumed for weights from file {weights}", preread=read_state_dict(weights),
        )
    if pretrained:
        path, label = locate()
        return WeightSource(label.partition(":")[0], label, f"{label} ({path})", path, "")
    return WeightSource("random", "random init", "", None, "random init")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a weights file: safetensors, or a torch file read with ``weights_only=True``.

    A training checkpoint that wraps the weights (``{"state_dict": ...}``, ``{"model": ...}``)
    is unwrapped; a cdft LoRA run's checkpoint has its adapters merged into their base
    layers with the alpha it records (:func:`~cdft_core.models.lora.merge_lora_tensors`), so
    it loads as the plain model. A safetensors file is recognised by its content, whatever
    its name. Anything else is a one-line error naming the file.
    """
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"weights file {str(p)!r} does not exist; pass --weights PATH to an existing file")
    metadata: Mapping[str, str] = {}
    try:
        if p.suffix == ".safetensors" or _looks_like_safetensors(p):  # the content decides, not the name
            from safetensors import safe_open

            with safe_open(str(p), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                data: Any = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        else:
            with warnings.catch_warnings():  # torch's "Detected pickle protocol 4" would add 2 lines
                warnings.simplefilter("ignore")
                data = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # the type matters: torch reports a bad first byte as a bare KeyError(101)
        if "weights_only" in str(exc):  # torch's text advises unpickling in full: never relayed, even by --debug
            raise CdftError(_unpickling_message(str(p), exc)) from None
        raise CdftError(
            f"cannot read weights file {str(p)!r} ({type(exc).__name__}: {one_line(exc)}); "
            f"expected safetensors or a torch state dict"
        ) from exc
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}} is rare but harmless to accept
        if isinstance(data, Mapping):
            inner = next((data[k] for k in _CONTAINER_KEYS if isinstance(data.get(k), Mapping)), None)
            if inner is not None and not any(isinstance(v, torch.Tensor) for v in data.values()):
                data = inner
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CdftError(f"weights file {str(p)!r} does not hold a state dict (a mapping of names to tensors)")
    from cdft_core.models.lora import merge_lora_tensors

    return merge_lora_tensors(dict(data), _recorded_lora_alpha(metadata), str(p))


def _looks_like_safetensors(path: Path) -> bool:
    with path.open("rb") as handle:
        return safetensors_start(handle.read(9), path.stat().st_size)


def safetensors_start(head: bytes, size: int | None) -> bool:
    """Whether a file's first 9 bytes (and its size, when known) are safetensors' layout:
    an 8-byte little-endian header length that fits the file, then the JSON header's ``{``.
    Why: the content, not the name, says what a file is (weights saved as ``.bin``, a CSV
    passed where a checkpoint goes)."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return length > 0 and (size is None or length <= size - 8)


def _recorded_lora_alpha(metadata: Mapping[str, str]) -> float | None:
    """The LoRA alpha a cdft checkpoint's spec records (its strategy's options), if any."""
    import json

    try:
        options = json.loads(metadata.get("cdft_spec", "{}")).get("strategy", {}).get("options", {})
        return float(options["alpha"]) if "alpha" in options else None
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None


def _unpickling_message(path: str, exc: Exception) -> str:
    """Why a torch file failed the ``weights_only`` reader, without relaying torch's own text.

    That text advises re-running ``torch.load`` with ``weights_only=False``, which would run
    whatever code the file holds; cdft never gives that advice, whoever wrote the file.
    """
    opcode = re.search(r"Unsupported operand (\d+)", str(exc))
    if opcode:  # a byte the safe reader does not take: not a pickle, or pickle protocol 4 or higher
        return (f"cannot read weights file {path!r} (UnpicklingError: byte {opcode[1]} is no pickle opcode torch's "
                f"safe reader takes: not a torch file, or pickled with protocol 4 or higher); expected safetensors "
                f"or a torch state dict saved with pickle protocol 2 or 3")
    return (f"cannot read weights file {path!r}: it is a pickle holding objects other than tensors, which cdft never "
            f"unpickles (loading it could run code); convert it to .safetensors on a machine where you trust the file")


def strip_prefix(state_dict: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Remove the first prefix that every key carries (``module.``, ``backbone.model.``...)."""
    for prefix in prefixes:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


@dataclass
class LoadReport:
    """What a checked load did: kept for the run's log and tests."""

    source: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source}"
        if self.ignored:
            text += f"; ignored {len(self.ignored)} classifier tensor(s)"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected: {_few(self.unexpected)}"
        return text


def weights_origin(backbone: Any) -> str:
    """Where a built backbone's weights came from, for the run's first lines.

    ``loaded 152 tensors from hub:timm/vit_... (/root/.cache/huggingface/hub/...)``,
    ``loaded 152 tensors from file /data/vit.safetensors`` or ``random initialisation``;
    a plugin backbone that keeps no :class:`LoadReport` is described by its ``weights``.
    """
    report = getattr(backbone, "load_report", None)
    if isinstance(report, LoadReport):
        return report.summary()
    source = str(getattr(backbone, "weights", "") or "")
    if source in ("", "random init"):
        return "random initialisation"
    return source


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    model: str,
    source: str,
    ignore: Callable[[str], bool] = lambda key: False,
    allow_missing: Callable[[str], bool] = lambda key: False,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` or fail with one line that says why.

    - a shape mismatch means the file belongs to another architecture: error;
    - missing keys would leave part of the backbone random: error (except ``allow_missing``);
    - keys for which ``ignore(key)`` holds (the pretrained classifier) are dropped silently;
    - any other key the module lacks means the file was made for a model built with other
      creation arguments (UNI's ``blocks.N.ls1.gamma`` in a ViT built without layer scale):
      error, naming the keys and, where known, the missing argument (:func:`creation_hint`).
    """
    own = module.state_dict()
    report = LoadReport(source=source, loaded=0)
    kept: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for key, value in state_dict.items():
        if key not in own:
            (report.ignored if ignore(key) else report.unexpected).append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            kept[key] = value
    if mismatched:
        raise CdftError(
            f"weights {source} do not fit backbone {model!r}: {len(mismatched)} shape mismatch(es), e.g. "
            f"{_few(mismatched, 2)}; the file is for another architecture — pick the matching backbone name"
        )
    report.missing = [k for k in own if k not in kept and not allow_missing(k)]
    if len(report.missing) * 2 > len(own):  # most of the model absent: a file for another architecture
        raise CdftError(
            f"weights {source} miss {len(report.missing)} of {len(own)} tensors of backbone {model!r}, e.g. "
            f"{_few(report.missing)}; the file is for another architecture — pick the matching backbone name"
        )
    if report.unexpected:
        missing = f" and misses {len(report.missing)} ({_few(report.missing, 2)})" if report.missing else ""
        raise CdftError(
            f"weights {source} hold {len(report.unexpected)} tensor(s) that backbone {model!r} does not have: "
            f"{_few(report.unexpected)}{missing}; {creation_hint(report.unexpected + report.missing)}"
        )
    if report.missing:
        raise CdftError(
            f"weights {source} miss {len(report.missing)} of {len(own)} tensors of backbone {model!r}, e.g. "
            f"{_few(report.missing)}; {creation_hint(report.missing)}"
        )
    module.load_state_dict(kept, strict=False)
    report.loaded = len(kept)
    return report


#: Key fragments a timm ViT has only when built with a creation argument.
CREATION_HINTS: tuple[tuple[str, str], ...] = (
    (".ls1.gamma", "init_values (layer scale, e.g. init_values=1e-5)"),
    (".ls2.gamma", "init_values (layer scale, e.g. init_values=1e-5)"),
    ("reg_token", "reg_tokens (register tokens, e.g. reg_tokens=4)"),
    (".mlp.fc1_g", "mlp_layer=SwiGLU with act_layer=SiLU (a gated MLP)"),
    (".mlp.fc1_x", "mlp_layer=SwiGLU with act_layer=SiLU (a gated MLP)"),
    (".mlp.norm", "mlp_layer=SwiGLU (a normed gated MLP)"),
    ("cls_token", "class_token=True"),
    ("pos_embed", "pos_embed / no_embed_class (position embedding layout)"),
    (".attn.q_norm", "qk_norm=True"),
    ("fc_norm", "global_pool='avg' / fc_norm"),
)


def creation_hint(keys: Iterable[str]) -> str:
    """Which creation argument the model was likely built without (or with), from the odd keys."""
    found: list[str] = []
    for key in keys:
        for fragment, argument in CREATION_HINTS:
            if fragment in key and argument not in found:
                found.append(argument)
    if found:
        return f"the file's model was built with other creation arguments — check {'; '.join(found)}"
    return "use the file made for this architecture (same backbone name and creation arguments)"


def _few(items: list[str], n: int = 3) -> str:
    head = ", ".join(items[:n])
    return head + (f", ... ({len(items) - n} more)" if len(items) > n else "")

