"""``cdft grid GRID.yaml``: list, print or run the cells of a grid of experiments.

The file's format and the cells are :mod:`cdft_core.experiments.grid`; running them here is
:mod:`cdft_core.experiments.grid_runner`. This command parses, calls them and prints.
"""

from __future__ import annotations

from typing import Any

import click


@click.command("grid", context_settings={"max_content_width": 110})
@click.argument("grid_file", metavar="GRID.yaml")
@click.option("--dry-run", is_flag=True, help="List the cells (numbered from 0) and their state; run nothing.")
@click.option("--print-commands", is_flag=True,
              help="Print one self-contained command per cell (line N+1 is cell N), for a scheduler to run.")
@click.option("--jobs", type=int, default=1, show_default=True, metavar="N",
              help="Run N cells at once, each on its own GPU (on a machine without GPUs: N processes).")
@click.option("--cell", "cells", type=int, multiple=True, metavar="N",
              help="Only cell N (repeatable); `cdft grid GRID.yaml --cell $SLURM_ARRAY_TASK_ID` runs or resumes one.")
@click.option("--output", "-o", default=None, metavar="DIR|URL",
              help="Parent of the cells' directories (default: the file's output, else runs/<grid file name>).")
def grid_command(grid_file: str, dry_run: bool, print_commands: bool, jobs: int, cells: tuple[int, ...],
                 output: str | None) -> None:
    """Run every cell of GRID.yaml — the product of its lists of run options, each cell a
    `cdft cv` (or a `cdft run`) in <output>/<cell name> — one after the other or --jobs N at
    once. Done cells are skipped, started ones resumed; a failed cell does not stop the
    others (they are listed at the end, and the exit code is 1). See docs/experiments.md.

    \b
    Examples:
      cdft grid configs/grids/paper.yaml --dry-run
      cdft grid configs/grids/paper.yaml --print-commands > commands.txt
      cdft grid configs/grids/paper.yaml --jobs 4
    """
    from cdft_core.errors import CdftError, UsageError
    from cdft_core.experiments.commands import shell_line
    from cdft_core.experiments.grid import cell_args, load_grid
    from cdft_core.experiments.grid_runner import run_grid

    if dry_run and print_commands:
        raise UsageError("--dry-run and --print-commands both list the cells; choose one")
    grid = load_grid(grid_file, output=output)
    chosen = _chosen(grid.cells, cells)
    if print_commands:
        for cell in chosen:
            click.echo(shell_line(["cdft", *cell_args(grid, cell)]))
        return
    if dry_run:
        click.echo(_listing(grid, chosen))
        return
    outcomes = run_grid(grid, chosen, jobs=jobs)
    failed = [o for o in outcomes if o.status == "failed"]
    ran = sum(o.status == "done" for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    click.echo(f"grid {grid.source}: {ran} cell(s) ran, {skipped} were done already, {len(failed)} failed")
    if failed:
        for o in failed:
            click.echo(f"  failed: cell {o.cell.index} {o.cell.name} (exit code {o.exit_code}): {o.error}; log {o.log}")
        names = ", ".join(f"{o.cell.index} {o.cell.name}" for o in failed)
        raise CdftError(f"{len(failed)} of {len(outcomes)} cells failed ({names}); fix them and run "
                        f"`cdft grid {grid.source}` again: done cells are skipped")


def _chosen(cells: list[Any], numbers: tuple[int, ...]) -> list[Any]:
    from cdft_core.errors import UsageError

    if not numbers:
        return cells
    unknown = [n for n in numbers if not 0 <= n < len(cells)]
    if unknown:
        raise UsageError(f"--cell {unknown[0]} does not exist; the grid has cells 0..{len(cells) - 1}")
    return [cells[n] for n in sorted(set(numbers))]


def _listing(grid: Any, cells: list[Any]) -> str:
    """The ``--dry-run`` table: number, name, each axis' value, state; then the counts."""
    from cdft_cli.output import table
    from cdft_core.experiments.grid import cell_status

    statuses = {c.index: cell_status(grid, c) for c in cells}
    states = {i: f"{s} ({', '.join(changes[:3])}{', ...' if len(changes) > 3 else ''})" if changes else s
              for i, (s, changes) in statuses.items()}
    rows = [(c.index, c.name, *(c.labels[a] for a in grid.axes), states[c.index]) for c in cells]
    counts = {s: [state for state, _ in statuses.values()].count(s) for s in ("done", "started", "new", "changed")}
    kind = "cross-validation" if grid.command == "cv" else "run"
    changed = f", {counts['changed']} changed (remove their directories or restore the file)" if counts["changed"] else ""
    footer = (f"\n\n{len(cells)} cells (each a {kind}; {grid.excluded} excluded): {counts['done']} done, "
              f"{counts['started']} started, {counts['new']} new{changed}; directories under {grid.output}")
    return table(rows, ("#", "cell", *grid.axes, "state"), max_width=None) + footer
