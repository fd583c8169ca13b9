"""Running a grid's cells on this machine: one after the other, or ``jobs`` at once with one
GPU each; done cells skipped, started ones resumed, a failed cell never stopping the rest,
and nothing run while a cell's directory holds other settings than the grid file now gives.

Why subprocesses: each cell is exactly the ``cdft`` command ``--print-commands`` shows (or
its ``--resume`` form), so a local grid and a scheduled one run the same thing; and a
cell that crashes or leaks GPU memory takes nothing else with it. Each cell's output goes
to ``<output>/<cell name>.log`` (appended, so a resumed cell keeps its history); with
several jobs on GPUs each cell sees one device through ``CUDA_VISIBLE_DEVICES``.

SIGTERM or Ctrl-C passes SIGTERM on to the running cells, which save a resumable state;
running the grid again continues them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from cdft_core.errors import Interrupted, UsageError
from cdft_core.experiments.grid import Cell, Grid, cell_args, cell_dir, cell_status, resume_args
from cdft_core.text import one_line

#: seconds between looks at the running cells
POLL_S = 0.5


@dataclass(frozen=True)
class Outcome:
    """What became of one cell: ``skipped`` (done before), ``done`` or ``failed`` (with its exit code)."""

    cell: Cell
    status: str
    exit_code: int | None = None
    log: str | None = None
    error: str = ""
    seconds: float = 0.0


def visible_gpus() -> list[str]:
    """The GPUs cells may use: ``CUDA_VISIBLE_DEVICES`` as given, else every CUDA device torch sees."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def device_slots(jobs: int, cells: Sequence[Cell], gpus: Sequence[str] | None = None) -> list[str | None]:
    """One slot per job: a GPU id each when several jobs share a machine with GPUs, else None
    (one job keeps every GPU; on a CPU-only machine the jobs are simply processes)."""
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {jobs}")
    if jobs == 1:
        return [None]
    gpus = list(visible_gpus() if gpus is None else gpus)
    if not gpus:
        return [None] * jobs
    if jobs > len(gpus):
        raise UsageError(f"--jobs {jobs} runs each cell on its own GPU, and {len(gpus)} GPU(s) are visible; "
                         f"use --jobs {len(gpus)} or fewer")
    several = [c for c in cells if str(c.values.get("nproc_per_node", "1")) != "1"]
    if several:
        raise UsageError(f"--jobs {jobs} gives each cell one GPU, but cell {several[0].index} ({several[0].name}) asks "
                         f"for nproc_per_node {several[0].values['nproc_per_node']}; use --jobs 1 for multi-GPU cells")
    return list(gpus[:jobs])


def log_path(grid: Grid, cell: Cell) -> str:
    """``<output>/<cell name>.log`` for a local output; for a URL output, the same name under ./grid-logs."""
    directory = cell_dir(grid, cell)
    if "://" in directory or "::" in directory:
        directory = os.path.join("grid-logs", cell.name)
    return directory + ".log"


@dataclass
class _Running:
    cell: Cell
    slot: str | None
    log: IO[str]
    started: float


def run_grid(grid: Grid, cells: Sequence[Cell], *, jobs: int = 1, say: Callable[[str], None] | None = None,
             program: Sequence[str] | None = None) -> list[Outcome]:
    """Run ``cells`` (done ones skipped, started ones resumed), ``jobs`` at a time; returns
    one outcome per cell, in cell order. A changed cell refuses the whole run (:func:`refuse_changed`). ``program`` runs ``cdft`` (default: this Python's ``-m cdft_cli``)."""
    say = say or _stderr
    program = list(program or [sys.executable, "-m", "cdft_cli"])
    free = device_slots(jobs, cells)
    outcomes: dict[int, Outcome] = {}
    pending: deque[tuple[Cell, list[str]]] = deque()
    states = {cell.index: cell_status(grid, cell) for cell in cells}
    refuse_changed(grid, cells, states)
    for cell in cells:
        state = states[cell.index][0]
        if state == "done":
            outcomes[cell.index] = Outcome(cell, "skipped")
            say(f"grid: cell {cell.index} {cell.name} is done: skipped")
        else:
            pending.append((cell, resume_args(grid, cell) if state == "started" else cell_args(grid, cell)))
    running: dict[subprocess.Popen, _Running] = {}
    previous = _raise_on_sigterm()
    try:
        while pending or running:
            while pending and free:
                cell, args = pending.popleft()
                slot = free.pop(0)
                proc, handle = _start(grid, cell, [*program, *args], slot, jobs, say)
                running[proc] = _Running(cell, slot, handle, time.time())
            time.sleep(POLL_S)
            for proc in [p for p in running if p.poll() is not None]:
                job = running.pop(proc)
                job.log.close()
                free.append(job.slot)
                outcomes[job.cell.index] = _finish(grid, job.cell, proc.returncode, time.time() - job.started, say)
    except (KeyboardInterrupt, Interrupted) as exc:
        _stop(running)
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
        raise Interrupted(f"grid stopped; the running cells saved their state: run `cdft grid {grid.source}` "
                          f"again to continue them", exit_code=code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [outcomes[c.index] for c in cells]


def refuse_changed(grid: Grid, cells: Sequence[Cell], states: dict[int, tuple[str, list[str]]]) -> None:
    """One usage error, before any cell starts, when a cell's directory holds a run made with
    other settings than the grid file now gives: resuming would go on with the saved ones
    and skipping would keep results the file no longer describes."""
    changed = [c for c in cells if states[c.index][0] == "changed"]
    if not changed:
        return
    shown = ", ".join(f"{c.index} {c.name} ({', '.join(states[c.index][1][:3])}"
                      f"{', ...' if len(states[c.index][1]) > 3 else ''})" for c in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    dirs = " ".join(cell_dir(grid, c) for c in changed[:3]) + (" ..." if more else "")
    one, them = (f"cell {shown} holds", "it") if len(changed) == 1 else (f"cells {shown}{more} hold", "them")
    raise UsageError(f"{one} a run made with other settings than {grid.source} now gives; remove {dirs} "
                     f"to run {them} anew with the new settings, or restore the grid file")


def _start(grid: Grid, cell: Cell, command: list[str], slot: str | None, jobs: int,
           say: Callable[[str], None]) -> tuple[subprocess.Popen, IO[str]]:
    """Start one cell in its own session (a Ctrl-C reaches it as our SIGTERM, never twice)."""
    from cdft_core.experiments.commands import shell_line

    path = log_path(grid, cell)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed when the cell ends
    handle.write(f"$ {shell_line(command)}\n")
    handle.flush()
    env = dict(os.environ)
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    elif jobs > 1 and "OMP_NUM_THREADS" not in env:  # CPU cells share the cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    where = f" on GPU {slot}" if slot is not None else ""
    say(f"grid: cell {cell.index} {cell.name} started{where} (log {path})")
    return proc, handle


def _finish(grid: Grid, cell: Cell, code: int, seconds: float, say: Callable[[str], None]) -> Outcome:
    path = log_path(grid, cell)
    if code == 0:
        say(f"grid: cell {cell.index} {cell.name} done in {seconds:.0f} s")
        return Outcome(cell, "done", 0, path, seconds=seconds)
    error = _last_error(path) or f"exit code {code}"
    say(f"grid: cell {cell.index} {cell.name} failed (exit code {code}): {error}")
    return Outcome(cell, "failed", code, path, error, seconds)


def _last_error(path: str) -> str:
    """The last ``cdft: error:`` line of a cell's log (its one-line reason)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line for line in handle.read().splitlines() if line.startswith("cdft: error: ")]
    except OSError:
        return ""
    return one_line(lines[-1].removeprefix("cdft: error: "), 300) if lines else ""


def _stop(running: dict[subprocess.Popen, _Running], grace_s: float = 120.0) -> None:
    """SIGTERM to every running cell (each saves a resumable state), then wait for them."""
    for proc in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for proc, job in running.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        job.log.close()


def _raise_on_sigterm() -> Any:
    """While the grid runs, SIGTERM (a scheduler stopping it) stops it as Ctrl-C does."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted("stopped by SIGTERM", exit_code=143)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler
        return None


def _stderr(message: str) -> None:
    print(f"cdft: {message}", file=sys.stderr, flush=True)
