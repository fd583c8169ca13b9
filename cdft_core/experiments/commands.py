"""Run options written out as the ``cdft`` command line spells them.

Why one place: ``cdft cv`` hands each rotation to torchrun's workers as a ``cdft run``
command line, and ``cdft grid --print-commands`` prints one ``cdft cv`` line per cell for a
scheduler to run. Both must spell every option exactly as ``cdft run`` parses it: a config
key with dashes (``val_fold`` -> ``--val-fold``), booleans as ``--x``/``--no-x``, option
dictionaries as repeated ``--dataset-option KEY=VALUE``. tests/test_cv.py parses these
lines back with ``cdft run``'s own parser.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from cdft_core.config import RunConfig

#: config fields given as repeatable ``--<name>-option KEY=VALUE`` options (as ``cdft run`` names them)
DICT_FLAGS = {"dataset_options": "--dataset-option", "adapter_options": "--adapter-option",
              "strategy_options": "--strategy-option"}


def flag(name: str) -> str:
    """``val_fold`` -> ``--val-fold``."""
    return "--" + name.replace("_", "-")


def option_args(values: Mapping[str, Any]) -> list[str]:
    """``{"val_fold": 1, "pretrained": False, "dataset_options": {"task": "x"}}`` ->
    ``["--val-fold", "1", "--no-pretrained", "--dataset-option", "task=x"]``; None is left out
    (unset is the default, and the command line has no spelling for it)."""
    args: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if name in DICT_FLAGS:
            for key, item in value.items():
                args += [DICT_FLAGS[name], f"{key}={_text(item)}"]
        elif isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            args += [flag(name), _text(value)]
    return args


def _text(value: Any) -> str:
    """A value as the option parser reads it back: floats exactly, containers as JSON (flow YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def changed_values(config: RunConfig) -> dict[str, Any]:
    """The fields of ``config`` that differ from the defaults, in declaration order: with
    :func:`option_args`, a command line that rebuilds ``config`` exactly."""
    defaults = RunConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(RunConfig)
            if getattr(config, f.name) != getattr(defaults, f.name)}


def shell_line(words: Iterable[str]) -> str:
    """Words joined into one line a POSIX shell splits back into the same words."""
    return " ".join(shlex.quote(str(word)) for word in words)
