"""Multi-process launching through torchrun's own launcher, called as a library.

``cdft run --nproc-per-node N ...`` builds torchrun's command line with torchrun's own
parser (``torch.distributed.run.get_args_parser``) and hands it to
``torch.distributed.run.run``: the elastic agent starts the workers, watches them, and
stops the whole job when one fails. Each worker runs the :class:`WorkerCommand` it is
given (for ``cdft run``: ``python -m cdft_cli run ...`` with the same run options) and, finding torchrun's environment variables, trains in-process
as one rank. No launcher of our own.

- No ``--rdzv-endpoint`` (one node): a standalone c10d rendezvous on a free local port,
  so two jobs on one machine never collide.
- With ``--rdzv-endpoint HOST:PORT`` (several nodes): every node runs the same command
  with ``--nnodes M``; the c10d rendezvous on HOST:PORT assigns the node ranks
  (``--rdzv-backend static`` uses ``--node-rank`` instead).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cdft_core.errors import CdftError, Interrupted, UsageError
from cdft_core.text import env_flag

#: set for the workers of :func:`launch`: they leave reporting their errors to the launcher
#: (one line for the whole job), and rank 0 writes its run directory to the file it names
LAUNCHED_ENV = "CDFT_LAUNCHED_RUN_DIR_FILE"


@dataclass(frozen=True)
class WorkerCommand:
    """What each worker runs: ``python -m MODULE ARGS...`` (the caller builds it; the
    launcher does not know the CLI's argument format)."""

    module: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class LaunchOptions:
    """The launcher options ``cdft run`` accepts (a subset of torchrun's)."""

    nproc_per_node: str | None = None
    nnodes: str | None = None
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_backend: str | None = None

    @property
    def requested(self) -> bool:
        """Whether any launcher option was given (then ``cdft run`` launches workers)."""
        return any(v is not None for v in (self.nproc_per_node, self.nnodes, self.node_rank, self.rdzv_endpoint,
                                           self.rdzv_id, self.rdzv_backend))


def torchrun_argv(options: LaunchOptions, worker: WorkerCommand) -> list[str]:
    """The torchrun command line for ``options``; raises UsageError for impossible ones."""
    nnodes = options.nnodes or "1"
    try:
        max_nodes = int(nnodes.split(":")[-1])
        min_nodes = int(nnodes.split(":")[0])
    except ValueError:
        raise UsageError(f"--nnodes expects N or MIN:MAX, got {nnodes!r}") from None
    if not 0 < min_nodes <= max_nodes:
        raise UsageError(f"--nnodes {nnodes!r} must be positive (MIN <= MAX)")
    nproc = options.nproc_per_node or "1"
    if not (nproc.isdigit() and int(nproc) > 0) and nproc not in ("cpu", "gpu", "auto"):
        raise UsageError(f"--nproc-per-node expects a positive number (or auto, cpu, gpu), got {nproc!r}")
    backend = options.rdzv_backend or "c10d"
    if backend not in ("c10d", "static"):
        raise UsageError(f"--rdzv-backend must be c10d or static, got {backend!r}")
    if options.node_rank is not None and options.node_rank < 0:
        raise UsageError(f"--node-rank must not be negative, got {options.node_rank}")
    if options.node_rank is not None and options.node_rank >= max_nodes:
        raise UsageError(f"--node-rank {options.node_rank} must be below --nnodes {nnodes}")
    # no restarts: a restarted worker would start the run afresh (use `cdft run --resume` instead)
    argv = ["--nproc-per-node", nproc, "--nnodes", nnodes, "--max-restarts", "0"]
    if options.rdzv_endpoint:
        host, sep, port = options.rdzv_endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UsageError(f"--rdzv-endpoint expects HOST:PORT, got {options.rdzv_endpoint!r}")
        argv += ["--rdzv-backend", backend, "--rdzv-endpoint", options.rdzv_endpoint,
                 "--rdzv-id", options.rdzv_id or "cdft"]
        if backend == "static":
            argv += ["--node-rank", str(options.node_rank or 0), "--master-addr", host, "--master-port", port]
    else:
        if max_nodes > 1:
            raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        argv += ["--standalone"]
    return [*argv, "--module", worker.module, *worker.args]


def launch(options: LaunchOptions, worker: WorkerCommand) -> None:
    """Start the workers through torchrun and wait; failed workers become one CdftError."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_argv(options, worker))
    if "OMP_NUM_THREADS" not in os.environ and str(args.nproc_per_node).isdigit():
        # share this machine's cores between the workers (torchrun would force 1 and warn)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(args.nproc_per_node)))
    handle, run_dir_file = tempfile.mkstemp(prefix="cdft-run-dir.", suffix=".txt")
    os.close(handle)
    os.environ[LAUNCHED_ENV] = run_dir_file
    try:
        with _quiet_torch_logs():
            run(args)
    except ChildFailedError as exc:
        messages = [failure_message(f) for f in exc.failures.values()]
        if all(m.startswith("Interrupted: ") for m in messages):  # every worker saved its state on SIGTERM
            raise Interrupted(messages[0].removeprefix("Interrupted: ")) from None
        raise CdftError(describe_failures(exc.failures) + resume_hint(run_dir_file, ", then ")) from None
    except SignalException as exc:
        raise Interrupted(f"launcher stopped by {signal.Signals(exc.sigval).name}; the workers saved a resumable "
                          f"state{resume_hint(run_dir_file, ': ') or ' (continue with `cdft run --resume RUN_DIR`)'}"
                          ) from None
    finally:
        os.environ.pop(LAUNCHED_ENV, None)
        with contextlib.suppress(OSError):
            os.unlink(run_dir_file)


def record_run_dir(url: str) -> None:
    """Rank 0 of a :func:`launch` job tells the launcher where its run directory is (for
    the resume command of a failed or stopped job); a no-op elsewhere."""
    path = os.environ.get(LAUNCHED_ENV)
    if path:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as out:
            out.write(url)


def resume_hint(run_dir_file: str, joiner: str) -> str:
    """``joiner`` + how to continue the job's run, when its run directory holds a saved state."""
    from cdft_core.training.rundir import RunDir

    try:
        with open(run_dir_file, encoding="utf-8") as handle:
            url = handle.read().strip()
        if url and RunDir(url).listdir("resume"):
            return f"{joiner}continue with `cdft run --resume {url}` (its last saved state)"
    except (OSError, ValueError, ImportError):
        pass
    return ""


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch's elastic-agent log lines (``E1126 ... failed``, ``W1126 ... Sending
    process ...``) while the job runs: the launcher reports a failure in one line of its
    own. ``--debug`` keeps them."""
    handlers = [] if env_flag("CDFT_DEBUG") else logging.getLogger("torch.distributed").handlers
    levels = [handler.level for handler in handlers]
    for handler in handlers:
        handler.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)


#: words of errors that a rank raises because *another* rank went away
_PEER_LOST = ("connection reset", "connection closed", "broken pipe", "peer", "timed out", "timeout", "nccl")


def failure_message(failure: Any) -> str:
    """The error a worker recorded (``@record`` writes it to torchrun's error file), on one line."""
    message = getattr(failure, "message", "") or ""
    if isinstance(message, dict):  # the error file's layout: {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    message = " ".join(str(message).split())
    if "pytorch.org/docs" in message or message.startswith("Signal "):
        return ""  # torchrun's placeholders add nothing
    for prefix in ("CdftError: ", "UsageError: "):
        message = message.removeprefix(prefix)
    return message


def describe_failures(failures: dict[int, Any]) -> str:
    """One line naming each failed rank with its exit status and first error line.

    The rank that failed on its own comes first; ranks that only lost their peer (a
    collective reporting a reset connection) come after it.
    """

    def short(failure: Any) -> str:
        message = failure_message(failure)
        return message[:300] + ("..." if len(message) > 300 else "")

    def status(failure: Any) -> str:
        code = getattr(failure, "exitcode", None)
        if code is not None and code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def secondary(item: tuple[int, Any]) -> tuple[bool, int, int]:
        rank, failure = item
        lost_peer = any(word in failure_message(failure).lower() for word in _PEER_LOST)
        return lost_peer, int(getattr(failure, "timestamp", 0)), rank

    parts = []
    for position, (rank, failure) in enumerate(sorted(failures.items(), key=secondary)):
        message = short(failure)
        if position > 0 and secondary((rank, failure))[0]:  # gloo's or NCCL's words for "the other rank is gone"
            message = "lost its connection to the failed rank"
        parts.append(f"rank {rank} {status(failure)}" + (f": {message}" if message else ""))
    return "distributed run failed: " + "; ".join(parts)
