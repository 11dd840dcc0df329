"""tidpo-mlx: Token-Importance Guided DPO (TI-DPO) with LoRA on MLX.

The fast BLAS is loaded here, before anything imports mlx, and glibc's malloc
is tuned for MLX's CPU allocator (both in ``backend/cpu``; they do nothing
where they do not apply).
"""

from tidpo_mlx.backend.cpu.allocator import tune as _tune_allocator
from tidpo_mlx.backend.cpu.blas import preload as _preload_blas

_preload_blas()
_tune_allocator()

__version__ = "0.1.0"
