"""glibc malloc tuned for MLX's CPU backend: freed buffers are reused, not returned to the kernel.

MLX's CPU allocator takes every intermediate array from ``malloc``. glibc
serves blocks above 128 KiB (a 4 x 64 x 1536 float32 activation is 1.5 MiB)
with a fresh ``mmap`` and unmaps them on ``free``, so every op of every step
page-faults its output in again: on the 2-core Linux machine of
``benchmarks/RESULTS.md`` ~12 % of the compute thread's time was in the
kernel clearing pages. Raising the mmap threshold to its 32 MiB maximum and
keeping up to 1 GiB of freed heap lets those blocks be reused: a DPO step ran
~15 % faster (1.60 vs 1.88 s, median of 3 alternating runs each).

Linux with glibc only; ``TIDPO_MLX_NO_MALLOPT=1`` opts out.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT_ENV = "TIDPO_MLX_NO_MALLOPT"
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))

STATUS = "not attempted"
"""What :func:`tune` did, for ``tidpo-mlx doctor``."""


def tune() -> str:
    """Apply :data:`SETTINGS` with ``mallopt`` once; return (and remember) what happened."""
    global STATUS
    if STATUS != "not attempted":
        return STATUS
    if not sys.platform.startswith("linux"):
        STATUS = "not Linux: system allocator as is"
    elif os.environ.get(OPT_OUT_ENV):
        STATUS = f"off ({OPT_OUT_ENV} set)"
    else:
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            STATUS = "no glibc mallopt: system allocator as is"
        else:
            ok = all(mallopt(key, value) == 1 for key, value in SETTINGS)
            STATUS = "glibc: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "glibc refused mallopt"
    return STATUS
