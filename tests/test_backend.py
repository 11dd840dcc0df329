"""The backend registry and the runtime it returns: its facts are what actually runs, its state is what compiles.

The memory estimate, the trainer and scoring read the runtime's facts instead of re-deriving them from the
config, so each fact is checked against the model as it runs; the full-fine-tune reference is checked through a
compiled function built with the runtime's compile state. The import graph is checked for cycles between the
core and a backend, lazy imports included.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from tidpo_mlx import memory
from tidpo_mlx.backend import BACKENDS, select
from tidpo_mlx.backend.cpu.attention import plain_classes
from tidpo_mlx.config import Switch, build_config
from tidpo_mlx.data import Example
from tidpo_mlx.errors import ModelError
from tidpo_mlx.models import attach_trainable, load_base
from tidpo_mlx.runtime import RowLayout

from conftest import make_tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "tidpo_mlx"


def _plain_blocks(model) -> int:
    return sum(type(layer.self_attn) in plain_classes() for layer in model.layers)


def _extent() -> memory.Extent:
    pairs = [Example(index=i, source="t", messages=[], prompt=[5] * 30, chosen=[6] * 20, rejected=[7] * 12)
             for i in range(2)]
    return memory.Extent.of(pairs, 2, shared=False)


@pytest.fixture(scope="module")
def linear_rope_model(tmp_path_factory):
    """A tiny llama whose RoPE is linearly scaled: the CPU backend cannot swap its attention."""
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny-linear-rope"))
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_plain_attention_facts_are_what_runs_and_what_the_estimate_counts(tiny_model, linear_rope_model):
    """plain attention on: every block runs the plain-op class and the estimate counts its score matrix; a family
    the backend cannot swap runs fused and the estimate counts none (it used to count plain scores on CPU)."""
    n_blocks = None
    estimates = {}
    for name, path, keys in (("plain", tiny_model, {}), ("portable", tiny_model, {"plain_attention": "false"}),
                             ("unswapped", linear_rope_model, {})):
        model, _, _ = load_base(path)
        n_blocks = len(model.layers)
        cfg = build_config({"model": "x", "num_layers": 1, "preset": "paper", **keys})
        rt = select(model, cfg, name)
        facts = rt.facts
        assert facts.score_matrix == (_plain_blocks(model) > 0), name
        assert facts.backward_blocks == n_blocks  # hybrid weights: d/dE goes through every block
        decision = memory.decide(Switch.AUTO, model, facts, _extent())
        assert decision.estimate.activations == memory.activation_bytes(model, n_blocks, _extent(), facts.score_matrix)
        estimates[name] = decision.estimate.activations
        if name == "plain":
            assert facts.backend == "cpu" and _plain_blocks(model) == n_blocks
            assert facts.layout is RowLayout.SHARED_PREFIX
        elif name == "portable":
            assert facts.backend == "portable" and _plain_blocks(model) == 0 and facts.layout is RowLayout.ROWS
        else:
            assert facts.backend == "cpu" and _plain_blocks(model) == 0 and facts.layout is RowLayout.ROWS
            with pytest.raises(ModelError, match="plain_attention: true"):
                select(model, dataclasses.replace(cfg, plain_attention=Switch.TRUE), name)
    assert estimates["plain"] > estimates["portable"] == estimates["unswapped"]


def test_dequantized_and_backward_block_facts(tiny_quantized_model):
    dpo = build_config({"model": "x", "num_layers": 1, "loss_type": "dpo", "weighting": "none", "gamma": 0.0})
    kept, _, _ = load_base(tiny_quantized_model, Switch.FALSE)
    dequantized, _, _ = load_base(tiny_quantized_model)
    assert select(kept, dpo).facts.quantized and not select(dequantized, dpo).facts.quantized
    assert select(dequantized, dpo).facts.backward_blocks == 1
    assert select(dequantized, dataclasses.replace(dpo, num_layers=-1)).facts.backward_blocks == len(dequantized.layers)


def test_whole_rows_keeps_the_model_the_reference_and_the_attention(tiny_model):
    model, _, _ = load_base(tiny_model)
    cfg = build_config({"model": "x", "num_layers": 1})
    rt = select(model, cfg, reference=attach_trainable(model, cfg))
    whole = rt.whole_rows()
    assert rt.facts.layout is RowLayout.SHARED_PREFIX and whole.facts.layout is RowLayout.ROWS
    assert dataclasses.replace(whole.facts, layout=rt.facts.layout) == rt.facts
    assert whole.model is model and whole.whole_rows() is whole
    same = [(a is b) for (_, a), (_, b) in zip(tree_flatten(whole.compile_state), tree_flatten(rt.compile_state))]
    assert len(same) > 4 and all(same)


def test_full_fine_tune_reference_is_compiled_state(tiny_model):
    """Inside the reference switch the trained blocks hold their original weights, also in a function compiled
    with the runtime's state; the reference's arrays are inputs of that function, not constants baked in."""
    model, _, _ = load_base(tiny_model)
    cfg = build_config({"model": "x", "fine_tune_type": "full", "num_layers": 1})
    reference = attach_trainable(model, cfg)
    rt = select(model, cfg, reference=reference)
    tokens = mx.array([[1, 5, 9, 30, 31, 2]])
    original = np.array(model(tokens))
    weights = dict(tree_flatten(model.trainable_parameters()))
    assert weights and reference.state.keys() == weights.keys()
    state = {id(a) for _, a in tree_flatten(rt.compile_state)}
    assert all(id(a) in state for a in reference.state.values())
    model.load_weights([(k, v + 0.05) for k, v in weights.items()], strict=False)
    trained = np.array(model(tokens))
    assert np.abs(trained - original).max() > 1e-3

    def both(t: mx.array) -> tuple[mx.array, mx.array]:
        with rt.reference():
            ref = model(t)
        return model(t), ref

    compiled = rt.compile(both)
    policy, ref = (np.array(a) for a in compiled(tokens))
    np.testing.assert_allclose(ref, original, atol=1e-5)
    np.testing.assert_allclose(policy, trained, atol=1e-5)
    with rt.reference():
        np.testing.assert_allclose(np.array(model(tokens)), original, atol=1e-5)
    np.testing.assert_array_equal(np.array(model(tokens)), trained)
    for k in reference.state:  # a new reference in the same dict reaches the compiled function
        reference.state[k] = reference.state[k] * 0
    with rt.reference():
        zeroed = np.array(model(tokens))
    np.testing.assert_allclose(np.array(compiled(tokens)[1]), zeroed, atol=1e-5)
    assert np.abs(zeroed - original).max() > 1e-3


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every tidpo_mlx module ``path`` imports, at the top or inside a function (``from a import b``: ``a.b``
    where that is a module, else ``a``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(_module(path).split(".")[: -node.level] + [node.module])
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return found & modules


def test_no_import_cycle_between_the_core_and_a_backend():
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, set(paths)) - {m} for m, p in paths.items()}
    graph["tidpo_mlx.backend"] |= {b.builder for b in BACKENDS}  # imported by name when selected
    outside = [m for m in graph if not m.startswith("tidpo_mlx.backend")
               and any(i.startswith("tidpo_mlx.backend.cpu") for i in graph[m])]
    assert outside == []

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    backend = [m for m in graph if m.startswith("tidpo_mlx.backend")]
    core_users = {m for b in backend for m in reaches(b) if not m.startswith("tidpo_mlx.backend")}
    assert "tidpo_mlx.runtime" in core_users
    assert [(c, b) for c in core_users for b in backend if b in reaches(c)] == []
