"""YAML training recipes shipped with tidpo-mlx: named overlays on the Config defaults (``quickstart.yaml``
names the defaults themselves)."""
