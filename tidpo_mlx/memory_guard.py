"""Keeping MLX's buffer cache bounded over a long run (``clear_cache_threshold``).

MLX keeps freed buffers in a cache to reuse them. A buffer is reused only
for an array of about its size, so a run whose shapes vary (length-bucketed
batches, anchor sampling, periodic held-out passes) keeps adding buffers
for shapes it may not meet again: the process's resident memory climbs
while ``mx.get_peak_memory()`` stays flat (mlx-lm issues 828 and 1185;
mlx-lm's PR 986 bounds it by clearing the cache between steps). The policy
is mlx-lm's: after a training step, a held-out batch or an anchor sampling
call, clear the cache when it holds more than ``clear_cache_threshold``
bytes (mlx-lm's name and default, 0: whenever it holds anything, so the
cache never carries more than one step's buffers into the next).
"""

from __future__ import annotations

import mlx.core as mx


def after_step(threshold: int) -> bool:
    """Clear MLX's buffer cache if it holds more than ``threshold`` bytes; whether it was cleared."""
    if mx.get_cache_memory() > threshold:
        mx.clear_cache()
        return True
    return False
