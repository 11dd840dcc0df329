"""Platform implementations of the forward seam (:mod:`tidpo_mlx.forward`).

Only :func:`tidpo_mlx.forward.make_forward` imports a backend; the portable
core (data, losses, importance, objective, the loop) never does.
"""
