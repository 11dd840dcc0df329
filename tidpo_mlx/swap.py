"""A module's ``__call__`` replaced and restored without touching its parameters."""

from __future__ import annotations

from typing import Any, Callable

import mlx.nn as nn


class CallSwap:
    """Gives modules a subclass of their class whose ``__call__`` is ``call`` (one subclass per class).

    Only the class changes, so parameter names, weights and adapter files stay
    as they are, and :meth:`undo` gives the module its class back. Tracing
    (``mx.grad``, ``mx.compile``) runs the Python code, so a traced call of a
    swapped module runs ``call``.
    """

    def __init__(self, prefix: str, call: Callable[..., Any]):
        self.prefix = prefix
        self.call = call
        self._made: dict[type, type] = {}

    def applied(self, module: nn.Module) -> bool:
        """Whether ``module`` runs ``call`` now."""
        return type(module) in self._made.values()

    def apply(self, module: nn.Module) -> None:
        """Swap ``module`` to the subclass (no-op when it already is)."""
        if self.applied(module):
            return
        cls = type(module)
        if cls not in self._made:
            self._made[cls] = type(f"{self.prefix}{cls.__name__}", (cls,), {"__call__": self.call})
        module.__class__ = self._made[cls]

    def undo(self, module: nn.Module) -> None:
        """Give ``module`` its own class back (no-op when it is not swapped)."""
        if self.applied(module):
            module.__class__ = type(module).__mro__[1]

    def classes(self) -> set[type]:
        """The subclasses made so far."""
        return set(self._made.values())
