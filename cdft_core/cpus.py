"""How many CPUs this process may use: shared by data loading (``cdft_core.training.loaders``)
and the image cache's decoding threads (``cdft_core.data.image_cache``), which may not import
each other's packages."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), else the CPU count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
