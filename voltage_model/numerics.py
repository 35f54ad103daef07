"""Process-wide float settings, applied once at every entry point before any torch op.

Why at the start: ``torch.set_flush_denormal`` sets the calling thread's FTZ/DAZ bits, and
threads copy them only when created. torch's OpenMP workers are created by the first parallel
op, so a flag set later (inside ``fit``, say) leaves them computing with subnormal floats, ~60x
slower per matmul on x86. The graph converter already emits no subnormals
(``voltage_model.graphs.converter.SUBNORMAL_FLOOR``); this keeps every other op fast as well.
"""

from __future__ import annotations


def flush_subnormals() -> bool:
    """Flush subnormal floats to zero on this thread and every torch thread created after it.

    Returns whether the CPU supports it (x86 with SSE3; elsewhere it is a no-op).
    """
    import torch

    return bool(torch.set_flush_denormal(True))


def usable_cores() -> int:
    """Cores this process may use (respects CPU affinity / container cpusets)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
