"""A rank's memory, measured the way the planner predicts it: what training adds on top of
what the process held before the model was built, at its highest.

- CUDA: the caching allocator's statistics (``memory_allocated`` before the build, then
  ``max_memory_allocated`` after a reset once the model is built): tensors only, no context or
  allocator slack.
- CPU: the process's resident set from ``/proc/self/status`` (``VmRSS``, and the high-water mark
  ``VmHWM``, reset through ``/proc/self/clear_refs`` once the model is built so the build's own
  transients do not count). Elsewhere ``ru_maxrss``, which cannot be reset.
"""

from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "CPU resident set (VmHWM)" if _STATUS.exists() else "CPU ru_maxrss (not reset after the build)"


def current_bytes(device: torch.device) -> int:
    """What this process holds now."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if _STATUS.exists():
        return _status_kib("VmRSS") * 1024
    return _ru_maxrss_bytes()


def reset_peak(device: torch.device) -> None:
    """Start the high-water mark again from what is held now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
    except OSError:
        pass


def peak_bytes(device: torch.device) -> int:
    """The high-water mark since the last reset."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if _STATUS.exists():
        return _status_kib("VmHWM") * 1024
    return _ru_maxrss_bytes()


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field} line")


def _ru_maxrss_bytes() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
