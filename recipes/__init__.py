"""YAML training recipes shipped with tidpo-mlx (``quickstart.yaml`` is the default)."""
