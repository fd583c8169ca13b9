"""Multi-process launching through torchrun's own launcher, called as a library.

``cdft run --nproc-per-node N ...`` builds torchrun's command line with torchrun's own
parser (``torch.distributed.run.get_args_parser``) and hands it to
``torch.distributed.run.run``: the elastic agent starts the workers, watches them, and
stops the whole job when one fails. Each worker runs ``python -m cdft_cli run ...`` with
the same run options and, finding torchrun's environment variables, trains in-process
as one rank. No launcher of our own.

- No ``--rdzv-endpoint`` (one node): a standalone c10d rendezvous on a free local port,
  so two jobs on one machine never collide.
- With ``--rdzv-endpoint HOST:PORT`` (several nodes): every node runs the same command
  with ``--nnodes M``; the c10d rendezvous on HOST:PORT assigns the node ranks
  (``--rdzv-backend static`` uses ``--node-rank`` instead).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from cdft_core.errors import CdftError, UsageError

#: the module the workers run (``python -m cdft_cli run ...``)
WORKER_MODULE = "cdft_cli"


class Interrupted(CdftError):
    """The run was stopped by SIGTERM/SIGINT (preemption) after saving a resumable state."""

    exit_code = 143


@dataclass(frozen=True)
class LaunchOptions:
    """The launcher options ``cdft run`` accepts (a subset of torchrun's)."""

    nproc_per_node: str | None = None
    nnodes: str | None = None
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_backend: str | None = None
    max_restarts: int | None = None

    @property
    def requested(self) -> bool:
        """Whether any launcher option was given (then ``cdft run`` launches workers)."""
        return any(v is not None for v in (self.nproc_per_node, self.nnodes, self.node_rank, self.rdzv_endpoint,
                                           self.rdzv_id, self.rdzv_backend, self.max_restarts))


def torchrun_argv(options: LaunchOptions, worker_args: list[str]) -> list[str]:
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
    argv = ["--nproc-per-node", nproc, "--nnodes", nnodes, "--max-restarts", str(options.max_restarts or 0)]
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
    return [*argv, "--module", WORKER_MODULE, *worker_args]


def launch(options: LaunchOptions, worker_args: list[str]) -> None:
    """Start the workers through torchrun and wait; a failed worker becomes one CdftError."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_argv(options, worker_args))
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise CdftError(_describe_failure(rank, failure, len(exc.failures))) from None
    except SignalException as exc:
        raise Interrupted(
            f"launcher stopped by {signal.Signals(exc.sigval).name}; the workers saved a resumable state "
            f"(continue with `cdft run --resume RUN_DIR`)"
        ) from None


def _describe_failure(rank: int, failure: object, count: int) -> str:
    exitcode = getattr(failure, "exitcode", None)
    message = " ".join(str(getattr(failure, "message", "") or "").split())
    if exitcode is not None and exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with code {exitcode}"
    if "pytorch.org/docs" in message or message.startswith("Signal "):
        message = ""  # torchrun's generic placeholders add nothing to the line
    if message.startswith(("CdftError: ", "UsageError: ")):
        message = message.split(": ", 1)[1]
    others = f" ({count} processes failed)" if count > 1 else ""
    detail = f": {message}" if message else " (its error is printed above)"
    return f"distributed run failed: rank {rank} {how}{others}{detail}"
