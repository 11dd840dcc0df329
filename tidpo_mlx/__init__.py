"""tidpo-mlx: Token-Importance Guided DPO (TI-DPO) with LoRA on MLX.

Using it from Python: call :func:`tidpo_mlx.setup` first, before anything
imports mlx::

    import tidpo_mlx

    tidpo_mlx.setup()  # before mlx, mlx_lm or any tidpo_mlx module that uses them

    from tidpo_mlx.config import build_config
    from tidpo_mlx.trainer import train

On Linux it loads the fast OpenBLAS that MLX's CPU wheel lacks (it only takes
effect when loaded before mlx) and tunes glibc's malloc for MLX's allocator;
elsewhere it does nothing. Importing this package alone changes nothing in
the process: it imports no mlx and loads no library. The ``tidpo-mlx``
command calls :func:`setup` itself.
"""

from tidpo_mlx.backend import tune_process as setup

__all__ = ["setup", "__version__"]
__version__ = "0.1.0"
