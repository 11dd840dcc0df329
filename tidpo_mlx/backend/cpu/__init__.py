"""The CPU backend: speed work for MLX's CPU device, behind the forward seam.

What lives here, and why (every number in ``benchmarks/RESULTS.md``):

- ``blas.py`` / ``allocator.py``: OpenBLAS preloaded before mlx (MLX's Linux
  wheel ships a reference BLAS) and glibc's malloc tuned for MLX's
  allocator; run by ``process.tune`` from ``tidpo_mlx.setup()`` (the
  registry's ``tune_process``), no-ops elsewhere.
- ``attention.py``: llama-style attention and SwiGLU as plain ops, swapped in
  as subclasses of the blocks' own classes (parameter names unchanged).
- ``fastmath.py``: a fused polynomial ``exp`` for SiLU and the attention softmax.
- ``prefix.py``: the shared-prefix layout, each pair's prompt run once.
- ``runtime.py``: :class:`~tidpo_mlx.backend.cpu.runtime.CpuRuntime`, the
  runtime built from the pieces above, with its load-time checks
  (``build``, which the registry ``tidpo_mlx.backend`` calls).

The compile contract
--------------------
A TI-DPO step runs the policy forward twice on the same inputs: inside
``mx.grad`` for the attribution, and for the loss. ``mx.compile`` merges the
two (common subexpression elimination) only when both are the same graph:
the same ops on the same input arrays with the same constants. Everything in
this backend keeps to that:

1. Constants are built once per shape and shared (RoPE tables, causal mask in
   ``attention.rope_tables``); never ``mx.fast.rope``, the fused SDPA with
   ``mask="causal"``, or ``mx.arange`` inside a traced function (each call
   makes a new constant). Masks and positions are batch *inputs*.
2. The attribution and the loss slice the same input array the same way:
   the pair rows ``inputs[0:2B]`` run as their own forward in both, the anchor
   rows apart (``objective.batch_logprobs``'s row groups), and a forward
   never re-slices the rows it is given.
3. No nested ``mx.compile`` and no ``mx.custom_function`` in the forward
   (either keeps the step's compile from merging the two forwards).
4. Masked scores use the finite :data:`prefix.MASKED` (``fastmath.exp``
   needs finite inputs), never ``-inf``.

The portable core keeps rule 2 by construction and rule 1 where it builds
positions (``importance.gaussian_prior`` derives them with ``cumsum``). On
Metal none of this is used: the fused kernels stay.
"""
