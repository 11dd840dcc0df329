"""tidpo-mlx: Token-Importance Guided DPO (TI-DPO) with LoRA on MLX.

The fast BLAS is loaded here, before anything imports mlx (see ``blas.py``).
"""

from tidpo_mlx.blas import preload as _preload_blas

_preload_blas()

__version__ = "0.1.0"
