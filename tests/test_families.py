"""Every tested mlx-lm decoder family, as people bring them: Hugging Face folders saved by transformers 5.

Each family is a tiny random model built with transformers' own config and
model classes and saved with ``save_pretrained`` (so mlx-lm's sanitize and
config parsing run, and the config has ``rope_parameters`` only). Per family:
one training step, ``importance``, the printed ``mlx_lm.generate`` arguments
(``TrainResult.model_path`` + adapters) loading the trained model, the PEFT
export's logits in transformers + peft, and a 4-bit copy trained one step.
Then: ``dequantize: false``, mlx-community style mixed-bit quantization,
rope scaling from ``rope_parameters`` against transformers on a long input,
and the errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tidpo_mlx.config import build_config
from tidpo_mlx.errors import ModelError
from tidpo_mlx.backend import portable, select
from tidpo_mlx.models import Reference, attach_lora, load_adapted, load_base, resolve_model
from tidpo_mlx.runtime import Runtime
from tidpo_mlx.trainer import train

from conftest import arith_folder, write_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
FAMILIES = {
    # family: (transformers config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8,
                                                      "final_logit_softcapping": 2.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "query_pre_attn_scalar": 8,
                                                              "sliding_window_pattern": 2}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    # hidden 64: mlx-lm quantizes granite's o_proj / down_proj with group size 64
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"hidden_size": 64, "embedding_multiplier": 12.0, "logits_scaling": 4.0,
                                                         "residual_multiplier": 0.22, "attention_multiplier": 0.125}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}),
}
TOLERANCE = {"gemma3_text": 1e-3}
"""Ours vs transformers, relative: mlx-lm's gemma3_text rounds its embedding scale sqrt(D) to bfloat16 (~1e-4)."""
FUSED = {"phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}}
LLAMA_LINEAR = {f"self_attn.{p}_proj" for p in "qkvo"} | {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
TOKENS = [[(7 * i + 3) % 300 + 5 for i in range(24)]]


def hf_model(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A tiny random ``family`` model saved by transformers (safetensors) with the test tokenizer."""
    cfg_class, model_class, extra = FAMILIES[family]
    vocab = write_tokenizer(folder)
    settings = {**SMALL, **extra, **overrides}
    config = getattr(transformers, cfg_class)(
        vocab_size=vocab, max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=None,
        initializer_range=0.1, **settings,
    )
    torch.manual_seed(seed)
    getattr(transformers, model_class)(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The corrected-folder cache in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("TIDPO_MLX_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return arith_folder(tmp_path_factory.mktemp("pairs"), 4, 2)


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), adapter_path=str(out), iters=1, batch_size=2, num_layers=2,
                learning_rate=2e-2, warmup_steps=0, anchor="sample", anchor_max_tokens=4, val_batches=1)
    base.update(kw)
    return build_config(base)


def _train(model, data, out, **kw):
    cfg = _cfg(model, data, out, **kw)
    return cfg, train(cfg, log=lambda s: None, progress=False)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _peft_logits(hf_folder: Path, peft_dir: Path | None) -> np.ndarray:
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, peft_dir)
    with torch.no_grad():
        return model.eval()(torch.tensor(TOKENS)).logits.numpy()


def _portable(model: nn.Module) -> Runtime:
    """The portable runtime of ``model`` (mlx-lm's own forward, whole rows)."""
    return portable.build(model, build_config({}), "model", Reference(model))


def _ours(model: nn.Module) -> np.ndarray:
    """Logits through the runtime seam: embed -> hidden -> logits (the path the loss takes)."""
    rt = _portable(model)
    batch = {"tokens": mx.array(TOKENS)}
    return np.array(rt.logits(rt.hidden(rt.embed(batch), batch, slice(None))))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_attributes_exports_and_generates(family, data_dir, tmp_path):
    from mlx_lm import load

    from tidpo_mlx.convert.peft import to_peft
    from tidpo_mlx.evaluation import load_pairs
    from tidpo_mlx.inspection import importance_records

    folder = hf_model(tmp_path / family, family)
    cfg, result = _train(folder, data_dir, tmp_path / "ad")
    assert result.steps == 1 and np.isfinite(result.after["rewards/margins"])
    saved = json.loads((result.adapter_path / "adapter_config.json").read_text())
    assert set(saved["lora_parameters"]["keys"]) == FUSED.get(family, LLAMA_LINEAR)

    # tidpo-mlx's own path (the loss's), the printed mlx_lm.generate arguments and transformers + peft agree
    model, tok = load_adapted(str(folder), str(result.adapter_path), cfg)[:2]
    ours = _ours(model)
    printed, _ = load(str(result.model_path), adapter_path=str(result.adapter_path))
    theirs = np.array(printed(mx.array(TOKENS)))
    peft_dir = to_peft(result.adapter_path, tmp_path / "peft")
    hf_tuned, hf_base = _peft_logits(folder, peft_dir), _peft_logits(folder, None)
    assert _relative(hf_tuned, hf_base) > 1e-3  # the adapter matters
    assert _relative(ours, theirs) < 1e-4
    assert _relative(ours, hf_tuned) < TOLERANCE.get(family, 1e-4)

    # importance: finite, non-zero attribution on every response token
    records = importance_records(select(model, cfg), tok, cfg, load_pairs(str(data_dir / "valid.jsonl"), tok, cfg))
    for r in records:
        for side in ("chosen", "rejected"):
            attr = np.array(r[side]["attribution"])
            assert len(attr) == len(r[side]["token_ids"]) and np.isfinite(attr).all() and attr.max() > 0


def _assert_every_adapter_trained(adapter_path: Path) -> None:
    """Each ``lora_b`` (initially zero) is non-zero after step 1, and steps 2.. changed every tensor (``lora_a``'s
    first gradient is exactly zero, since ``lora_b`` starts at zero)."""
    def tensors(path: Path) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}

    first, last = tensors(adapter_path / "checkpoints" / "step-000001"), tensors(adapter_path)
    assert last and first.keys() == last.keys()
    assert not [k for k in first if k.endswith("lora_b") and not first[k].any()]
    assert not [k for k in last if np.array_equal(first[k], last[k])]


def _quantized_bases(model: nn.Module) -> list[bool]:
    """For every LoRA layer of ``model``: whether the frozen linear layer under it is still quantized."""
    return [isinstance(m.linear, nn.QuantizedLinear) for _, m in model.named_modules() if hasattr(m, "lora_a")]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_4bit_copy_trains(family, data_dir, tmp_path):
    """A 4-bit copy: two steps train every adapter tensor; the saved adapters on the quantized base in mlx-lm (the
    printed ``mlx_lm.generate`` arguments) give the logits of our (dequantized on the CPU) model, and matter."""
    from mlx_lm import load

    from tidpo_mlx.convert.hf import hf_to_mlx

    q4 = hf_to_mlx(hf_model(tmp_path / family, family), tmp_path / "q4", quantize=True, bits=4, group_size=32)
    assert json.loads((q4 / "config.json").read_text())["quantization"]["bits"] == 4
    cfg, result = _train(q4, data_dir, tmp_path / "ad", iters=2, steps_per_save=1)
    assert result.steps == 2 and np.isfinite(result.after["rewards/margins"])
    _assert_every_adapter_trained(result.adapter_path)
    model = load_adapted(str(q4), str(result.adapter_path), cfg)[0]
    printed, _ = load(str(result.model_path), adapter_path=str(result.adapter_path))
    plain, _ = load(str(result.model_path))
    assert _quantized_bases(printed) and all(_quantized_bases(printed))
    tokens = mx.array(TOKENS)
    theirs = np.array(printed(tokens))
    assert _relative(np.array(model(tokens)), theirs) < 1e-4
    assert _relative(theirs, np.array(plain(tokens))) > 1e-3


def test_dequantize_false_keeps_the_base_quantized(data_dir, tmp_path):
    """The closest CPU stand-in for the Metal path: quantized matmuls and a QuantizedEmbedding in the forward."""
    from mlx_lm import load

    from tidpo_mlx.convert.hf import hf_to_mlx

    q4 = hf_to_mlx(hf_model(tmp_path / "phi3", "phi3"), tmp_path / "q4", quantize=True, bits=4, group_size=32)
    cfg, result = _train(q4, data_dir, tmp_path / "ad", dequantize="false", iters=2, steps_per_save=1)
    assert np.isfinite(result.after["rewards/margins"])
    _assert_every_adapter_trained(result.adapter_path)
    model = load_adapted(str(q4), str(result.adapter_path), cfg)[0]
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert _quantized_bases(model) and all(_quantized_bases(model))
    printed, _ = load(str(result.model_path), adapter_path=str(result.adapter_path))
    tokens = mx.array(TOKENS)
    assert _relative(np.array(model(tokens)), np.array(printed(tokens))) < 1e-5


def test_mixed_bit_quantization_as_mlx_community_ships_it(data_dir, tmp_path):
    """Default 4-bit group 128, per-layer overrides (8-bit group 64, 4-bit group 32): trained and exported."""
    from mlx_lm import load
    from mlx_lm.convert import convert

    from tidpo_mlx.convert.peft import to_peft

    folder = hf_model(tmp_path / "llama", "llama", hidden_size=128, intermediate_size=256)

    def predicate(path: str, module: nn.Module):
        if path.endswith("mlp.down_proj"):
            return {"group_size": 64, "bits": 8}
        if path.endswith("self_attn.v_proj"):
            return {"group_size": 32, "bits": 4}
        return True

    mixed = tmp_path / "mixed"
    convert(str(folder), str(mixed), quantize=True, q_group_size=128, q_bits=4, quant_predicate=predicate)
    quant = json.loads((mixed / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 128 and quant["model.layers.0.mlp.down_proj"] == {"group_size": 64, "bits": 8}
    cfg, result = _train(mixed, data_dir, tmp_path / "ad")
    model = load_adapted(str(mixed), str(result.adapter_path), cfg)[0]
    printed, _ = load(str(result.model_path), adapter_path=str(result.adapter_path))
    assert _relative(_ours(model), np.array(printed(mx.array(TOKENS)))) < 1e-4
    peft_dir = to_peft(result.adapter_path, tmp_path / "peft")
    assert _relative(_peft_logits(folder, peft_dir), _peft_logits(folder, None)) > 1e-3


ROPE = {
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 100000.0, "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("kind", list(ROPE))
def test_rope_scaling_from_rope_parameters_matches_transformers_on_a_long_input(kind, tmp_path):
    """A long input (> original_max_position_embeddings): ours, and mlx-lm on the resolved folder, equal transformers'."""
    from mlx_lm import load

    folder = hf_model(tmp_path / kind, "llama", rope_parameters=ROPE[kind])
    assert "rope_theta" not in json.loads((folder / "config.json").read_text())
    ids = [[(11 * i + 5) % 300 + 5 for i in range(200)]]
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    model, _, _ = load_base(folder)
    assert _relative(np.array(model(mx.array(ids))), want) < 1e-4
    resolved = resolve_model(str(folder))
    assert resolved != folder and resolve_model(str(folder)) == resolved  # corrected once, then cached
    plain, _ = load(str(resolved))
    assert _relative(np.array(plain(mx.array(ids))), want) < 1e-4


def test_attribution_is_that_of_input_embeddings(tmp_path):
    """For a family with an ``input_embeddings`` argument, our path differentiates exactly the same function."""
    model, _, _ = load_base(hf_model(tmp_path / "qwen2", "qwen2"))
    rt = _portable(model)
    batch = {"tokens": mx.array(TOKENS)}
    e = rt.embed(batch)

    def ours(x):
        return rt.logits(rt.hidden(x, batch, slice(None))[:, -1:]).max()

    def theirs(x):
        return model(batch["tokens"], input_embeddings=x)[:, -1].max()

    np.testing.assert_allclose(np.array(mx.grad(ours)(e)), np.array(mx.grad(theirs)(e)), rtol=1e-5, atol=1e-7)


def test_keys_that_match_nothing_name_the_blocks_linear_layers(tmp_path):
    model, _, _ = load_base(hf_model(tmp_path / "phi3", "phi3"))
    cfg = build_config({"num_layers": 2, "lora_parameters": {"keys": ["self_attn.q_proj"]}})
    with pytest.raises(ModelError, match=r"self_attn.q_proj names no linear layer.*self_attn\.qkv_proj"):
        attach_lora(model, cfg)


def test_a_model_without_a_token_embedding_is_a_one_line_error():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Model(nn.Module):
        model_type = "strange"

        def __init__(self):
            super().__init__()
            self.model = Inner()

        @property
        def layers(self) -> list:
            return []

    with pytest.raises(ModelError, match="model type 'strange': no token embedding found"):
        select(Model(), build_config({}))
