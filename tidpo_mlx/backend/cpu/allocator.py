"""glibc malloc tuned for MLX's CPU backend: freed buffers are reused, not returned to the kernel.

MLX's CPU allocator takes every intermediate array from ``malloc``. glibc
serves blocks above its mmap threshold (128 KiB by default, smaller than one
activation of a training step) with a fresh ``mmap`` and unmaps them on
``free``, so every op of every step page-faults its output in again and the
kernel spends the compute thread's time clearing pages. Raising the mmap
threshold to its 32 MiB maximum and keeping up to 1 GiB of freed heap lets
those blocks be reused (the step-time gain is in ``benchmarks/RESULTS.md``).
Run from ``tidpo_mlx.setup()`` (``backend.tune_process``).

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
