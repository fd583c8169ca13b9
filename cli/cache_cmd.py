"""``cdft cache list`` / ``cdft cache clear``: the caches of ``cdft run`` and ``cdft probe``
— decoded images (:mod:`cdft_core.data.image_cache`) and a frozen backbone's features
(:mod:`cdft_core.training.feature_store`) — shown and freed."""

from __future__ import annotations

import os
import time

import click

from cdft_cli.output import echo_json, table, warn

_CACHE_DIR = click.option("--cache-dir", default=None, metavar="DIR",
                          help="The cache directory [default: $CDFT_CACHE_DIR, else ~/.cache/cdft].")


def check_cache_dir(cache_dir: str | None) -> None:
    """A ``--cache-dir`` that is a file is a usage error: listing it would say "no caches" and a
    run would fail once it tries to build there. A missing one is fine (it is made when needed)."""
    from cdft_core.errors import UsageError
    from cdft_core.text import one_line

    if cache_dir and os.path.isfile(os.path.expanduser(cache_dir)):
        raise UsageError(f"--cache-dir {one_line(cache_dir, 120)!r} is a file, not a folder; "
                         "pass another folder for the caches (or drop --cache-dir for the default)")


@click.group("cache")
def cache_command() -> None:
    """Show or free the caches `cdft run` builds: decoded images (`--no-cache` bypasses them) and
    frozen-backbone features (`--no-feature-cache`)."""


@cache_command.command("list")
@_CACHE_DIR
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects.")
def list_command(cache_dir: str | None, as_json: bool) -> None:
    """List the caches: key, kind, images, what they hold, MB on disk, last use, data root."""
    from cdft_core.data.cache_dir import cache_root, list_caches

    check_cache_dir(cache_dir)
    entries = list_caches(cache_dir)
    if as_json:
        echo_json([e.to_json() for e in entries])
        return
    where = cache_root(cache_dir)
    if not entries:
        click.echo(f"no caches in {where}")
        return
    rows = [(e.key[:12], e.kind, e.images if e.complete else "incomplete", f"{e.size} {e.interpolation}".strip(),
             f"{e.megabytes:.1f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)), e.root)
            for e in entries]
    click.echo(table(rows, ("key", "kind", "images", "contents", "MB", "last used", "data root"), max_width=None))
    click.echo(f"\n{len(entries)} cache{'s' if len(entries) != 1 else ''}, "
               f"{sum(e.megabytes for e in entries):.1f} MB in {where}")


@cache_command.command("clear")
@click.argument("keys", nargs=-1)
@_CACHE_DIR
def clear_command(keys: tuple[str, ...], cache_dir: str | None) -> None:
    """Remove every cache, or those whose key starts with one of KEYS (see `cdft cache list`).

    A cache that a process is building or using (a running job, `cdft eval`) is left in place;
    anything in the cache dir that is not a cdft cache folder is never touched.
    """
    from cdft_core.data.cache_dir import cache_root, clear_caches

    check_cache_dir(cache_dir)
    removed, busy = clear_caches(cache_dir, keys)
    for entry in busy:
        warn(f"cache {entry.key[:12]} is being built or used by a running process; left in place")
    if keys and not removed and not busy:
        warn(f"no cache key starts with {', '.join(keys)} (see `cdft cache list`)")
    freed = sum(e.megabytes for e in removed)
    click.echo(f"removed {len(removed)} cache{'s' if len(removed) != 1 else ''}, freed {freed:.1f} MB "
               f"in {cache_root(cache_dir)}")
