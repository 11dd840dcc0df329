"""GGUF export (``tidpo-mlx convert to-gguf``) checked by llama.cpp itself.

Per family, a tiny random model saved by transformers (as people bring them)
gets a random LoRA adapter on every linear layer of every block. The merged
GGUF runs in llama.cpp (``llama-cpp-python``, the optional ``llama`` extra;
those tests skip with a reason without it) and its logits for a 32-token chat
prompt are compared with the MLX model with the adapter: f16 within 1 % of the
logits' range, greedy 20-token continuations identical; q8_0 and q4_0 within
looser bounds. ``--lora-only`` applied by llama.cpp to an f16 base matches the
merged f16 file; our own ``gguf-to-mlx`` reads the llama-architecture exports
back; the chat template in the file formats a conversation in llama.cpp as the
tokenizer does. Then the bad inputs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import tidpo_mlx  # noqa: F401  (loads the fast BLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from conftest import write_tokenizer
from tidpo_mlx.convert.cli import convert as convert_cli
from tidpo_mlx.convert.gguf_export import lora_to_gguf, to_gguf
from tidpo_mlx.errors import ConvertError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
FAMILIES = {
    # family: (transformers config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16,
                                                      "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                                                      "sliding_window": 512}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window_pattern": 2,
                                                              "sliding_window": 512}),
}
LLAMA_ARCH = ("llama", "mistral")  # what our gguf-to-mlx reads back
MESSAGES = [
    {"role": "system", "content": "You are a tiny test model."},
    {"role": "user", "content": "What is 12 plus 30? Convert 3 km to metres, please, and list the days."},
]
F16_BOUND = 0.01  # max |llama.cpp - MLX| / range of the MLX logits
QUANT_BOUND = {"q8_0": 0.05, "q4_0": 0.5}


def hf_model(folder: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A tiny random ``family`` model saved by transformers with the test tokenizer (ChatML template)."""
    cfg_class, model_class, extra = FAMILIES[family]
    vocab = write_tokenizer(folder)
    config = getattr(transformers, cfg_class)(
        vocab_size=vocab, max_position_embeddings=512, eos_token_id=2, pad_token_id=0, bos_token_id=None,
        initializer_range=0.1, tie_word_embeddings=family != "phi3", **{**SMALL, **extra, **overrides},
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # norms away from their init, so a wrong norm convention shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def make_adapter(model_path: Path, folder: Path, *, rank: int = 4, scale: float = 2.0, seed: int = 0) -> Path:
    """A random LoRA adapter (non-zero ``lora_b``) on every linear of every block, saved as the trainer does."""
    from tidpo_mlx.config import build_config
    from tidpo_mlx.models import attach_lora, load_base, resolve_model, save_adapters

    path = resolve_model(str(model_path))
    model, _, _ = load_base(path, "true")
    cfg = build_config({"num_layers": -1, "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0}})
    attach_lora(model, cfg)
    mx.random.seed(seed)
    weights = {k: 0.1 * mx.random.normal(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    model.load_weights(list(weights.items()), strict=False)
    lp = cfg.lora_parameters
    save_adapters(model, folder, {
        "fine_tune_type": "lora", "num_layers": -1, "model": str(path),
        "lora_parameters": {"rank": lp.rank, "scale": lp.scale, "dropout": 0.0, "keys": []},
    })  # fmt: skip
    return folder


def mlx_model(model_path: Path, adapter: Path | None):
    """The MLX model with the adapter attached (float32) and its tokenizer."""
    from tidpo_mlx.config import build_config
    from tidpo_mlx.models import load_adapted

    loaded = load_adapted(str(model_path), str(adapter) if adapter else None, build_config({"dequantize": "true"}))
    return loaded[0], loaded[1]


def chat_ids(tokenizer) -> list[int]:
    """The chat prompt (system + user + generation prompt) as the tokenizer's own template writes it."""
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def prompt_tokens(tokenizer, n: int = 32) -> list[int]:
    """The first ``n`` tokens of :func:`chat_ids`."""
    ids = chat_ids(tokenizer)
    assert len(ids) >= n
    return list(ids[:n])


def mlx_logits(model, tokens: list[int]) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def mlx_greedy(model, tokens: list[int], n: int = 20) -> tuple[list[int], list[float]]:
    """Greedy continuation and, per step, the gap between the two best logits."""
    out, gaps = list(tokens), []
    for _ in range(n):
        last = mlx_logits(model, out)[-1]
        top = np.sort(last)[-2:]
        gaps.append(float(top[1] - top[0]))
        out.append(int(np.argmax(last)))
    return out[len(tokens):], gaps


def same_greedy(theirs: list[int], ours: list[int], gaps: list[float], error: float) -> bool:
    """Identical continuations, up to the first step where our two best logits are within ``2 * error``
    (the measured logit difference): a tie that f16 rounding may break either way, on a random tiny model."""
    for t, o, gap in zip(theirs, ours, gaps):
        if gap < 2 * error:
            return True
        if t != o:
            return False
    return True


def llama_cpp_model(path: Path, lora: Path | None = None):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")
    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0,
                           **kwargs)


def llama_cpp_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_cpp_file_logits(path: Path, tokens: list[int], lora: Path | None = None) -> np.ndarray:
    llm = llama_cpp_model(path, lora)
    try:
        return llama_cpp_logits(llm, tokens)
    finally:
        llm.close()


def llama_cpp_greedy(llm, tokens: list[int], n: int = 20) -> list[int]:
    llm.reset()
    llm.eval(tokens)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def relative(theirs: np.ndarray, ours: np.ndarray) -> float:
    """max |theirs - ours| / (max(ours) - min(ours))."""
    return float(np.abs(theirs - ours).max() / (ours.max() - ours.min()))


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The corrected-folder / GGUF caches in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDPO_MLX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """``family -> (hf folder, adapter folder)``, built once per module."""
    built = {}

    def get(family: str):
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            folder = hf_model(root / "hf", family)
            built[family] = folder, make_adapter(folder, root / "adapter")
        return built[family]

    return get


FIGURES: dict[str, dict] = {}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_gguf_runs_in_llama_cpp_like_mlx(family, family_models, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")
    folder, adapter = family_models(family)
    model, tokenizer = mlx_model(folder, adapter)
    tokens = prompt_tokens(tokenizer._tokenizer)
    ours = mlx_logits(model, tokens)
    figures = {}
    for outtype in ("f16", "q8_0", "q4_0"):
        out = tmp_path / f"{family}-{outtype}.gguf"
        to_gguf(str(folder), out, adapter_path=adapter, outtype=outtype)
        llm = llama_cpp_model(out)
        assert llm.tokenize(tokenizer._tokenizer.decode(tokens).encode(), add_bos=False, special=True) == tokens
        theirs = llama_cpp_logits(llm, tokens)
        figures[outtype] = relative(theirs, ours)
        if outtype == "f16":
            greedy, gaps = mlx_greedy(model, tokens)
            assert same_greedy(llama_cpp_greedy(llm, tokens), greedy, gaps, float(np.abs(theirs - ours).max()))
        llm.close()
    FIGURES[family] = figures
    print(f"\n{family}: max|llama.cpp - MLX| / range: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    assert figures["f16"] <= F16_BOUND
    for outtype, bound in QUANT_BOUND.items():
        assert figures[outtype] <= bound


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma3_text"])
def test_lora_only_applied_by_llama_cpp_matches_the_merged_file(family, family_models, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")
    import gguf

    folder, adapter = family_models(family)
    base, merged, lora = tmp_path / "base.gguf", tmp_path / "merged.gguf", tmp_path / "lora.gguf"
    to_gguf(str(folder), base)
    to_gguf(str(folder), merged, adapter_path=adapter)
    lora_to_gguf(str(folder), adapter, lora)
    fields = gguf.GGUFReader(str(lora)).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == pytest.approx(2.0 * 4)  # scale x rank
    assert lora.stat().st_size < base.stat().st_size

    _, tokenizer = mlx_model(folder, None)
    tokens = prompt_tokens(tokenizer._tokenizer)
    with_lora = llama_cpp_file_logits(base, tokens, lora=lora)
    fused = llama_cpp_file_logits(merged, tokens)
    plain = llama_cpp_file_logits(base, tokens)
    assert relative(plain, fused) > 0.05  # the adapter matters
    assert relative(with_lora, fused) <= F16_BOUND


@pytest.mark.parametrize("family", LLAMA_ARCH)
def test_our_gguf_to_mlx_reads_the_export_back(family, family_models, tmp_path):
    from mlx_lm import load

    from tidpo_mlx.convert.gguf import gguf_to_mlx

    folder, adapter = family_models(family)
    model, tokenizer = mlx_model(folder, adapter)
    tokens = prompt_tokens(tokenizer._tokenizer)
    out = tmp_path / "model.gguf"
    to_gguf(str(folder), out, adapter_path=adapter)
    back, back_tok = load(str(gguf_to_mlx(out, tmp_path / "back")))
    assert chat_ids(back_tok._tokenizer)[:32] == tokens
    assert relative(np.array(back(mx.array([tokens]))[0]), mlx_logits(model, tokens)) <= F16_BOUND


def llama_cpp_chat_ids(path: Path, hf_tokenizer) -> list[int]:
    """:data:`MESSAGES` formatted by llama.cpp's own chat formatting with the template in the file, tokenized."""
    import ctypes

    import llama_cpp

    llm = llama_cpp_model(path)
    try:
        template = llama_cpp.llama_model_chat_template(llm.model, None)
        assert template.decode() == hf_tokenizer.chat_template
        chat = (llama_cpp.llama_chat_message * len(MESSAGES))(
            *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in MESSAGES]
        )
        buf = ctypes.create_string_buffer(8192)
        n = llama_cpp.llama_chat_apply_template(template, chat, len(MESSAGES), True, buf, len(buf))
        assert 0 < n < len(buf)  # llama.cpp recognised the template
        return llm.tokenize(buf.raw[:n], add_bos=False, special=True)
    finally:
        llm.close()


def test_chat_template_formats_in_llama_cpp_as_the_tokenizer_does(family_models, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[llama]')")
    folder, _ = family_models("qwen2")
    _, tokenizer = mlx_model(folder, None)
    out = tmp_path / "model.gguf"
    to_gguf(str(folder), out)
    assert llama_cpp_chat_ids(out, tokenizer._tokenizer) == chat_ids(tokenizer._tokenizer)


# ----------------------------------------------------------------------------- bad input


def test_unsupported_family_is_named(tmp_path):
    folder = tmp_path / "m"
    write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "olmo2", "hidden_size": 8}))
    with pytest.raises(ConvertError, match=r"model family 'olmo2' cannot be exported to GGUF \(supported: llama, "):
        to_gguf(str(folder), tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*gguf*"))


@pytest.mark.parametrize("config, message", [
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "RoPE scaling 'yarn' of a llama model is not supported for GGUF export"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope"}}, "RoPE scaling 'longrope' of a phi3 model"),
    ({"model_type": "gemma2", "query_pre_attn_scalar": 144}, "query_pre_attn_scalar 144 is not what llama.cpp uses"),
])
def test_settings_llama_cpp_would_run_differently_are_refused(config, message):
    from tidpo_mlx.convert.gguf_families import check

    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "head_dim": 16}
    with pytest.raises(ConvertError, match=re.escape(message)):
        check({**base, **config})


def test_adapter_of_another_base_is_refused(family_models, tmp_path):
    folder, _ = family_models("llama")
    other = hf_model(tmp_path / "wide", "llama", intermediate_size=96)
    wrong = make_adapter(other, tmp_path / "wrong-adapter")
    for write in (lambda out: to_gguf(str(folder), out, adapter_path=wrong),
                  lambda out: lora_to_gguf(str(folder), wrong, out)):
        with pytest.raises(ConvertError, match="was the adapter trained on this base"):
            write(tmp_path / "out.gguf")
    assert not [p for p in tmp_path.iterdir() if "gguf" in p.name]


def test_existing_output_needs_overwrite(family_models, tmp_path):
    folder, _ = family_models("llama")
    out = tmp_path / "model.gguf"
    out.write_text("keep me")
    result = CliRunner().invoke(convert_cli, ["to-gguf", str(folder), str(out)])
    assert result.exit_code != 0 and f"{out} exists (pass --overwrite to replace it)" in result.output
    assert out.read_text() == "keep me"
    result = CliRunner().invoke(convert_cli, ["to-gguf", str(folder), str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"


def test_unwritable_folder_is_one_line_and_leaves_nothing(family_models, tmp_path):
    folder, _ = family_models("llama")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): the folder is not read-only to us")
        result = CliRunner().invoke(convert_cli, ["to-gguf", str(folder), str(locked / "m.gguf")])
        assert result.exit_code != 0 and str(locked / "m.gguf") in result.output
        assert len(result.output.strip().splitlines()) == 1
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_full_disk_is_one_line_and_leaves_no_half_file(family_models, tmp_path):
    """The kernel refuses writes past a file-size limit (RLIMIT_FSIZE): the writer's OSError is a full disk."""
    folder, _ = family_models("llama")
    out = tmp_path / "m.gguf"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "from tidpo_mlx.convert.cli import convert\n"
        f"convert.main(['to-gguf', {str(folder)!r}, {str(out)!r}], standalone_mode=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and str(out) in last and "could not write" in last, proc.stderr
    assert not list(tmp_path.iterdir())


def test_cli_ollama_modelfile_and_a_gguf_base(family_models, tmp_path):
    """``--ollama`` beside a merged file; ``--lora-only --ollama`` from a GGUF base names it in FROM."""
    folder, adapter = family_models("llama")
    merged = tmp_path / "merged" / "model.gguf"
    result = CliRunner().invoke(convert_cli, ["to-gguf", str(folder), str(merged), "-a", str(adapter), "--ollama"])
    assert result.exit_code == 0, result.output
    text = (merged.parent / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"") and 'PARAMETER stop "<|im_end|>"' in text

    base = tmp_path / "base.gguf"
    to_gguf(str(folder), base)
    lora = tmp_path / "lora" / "adapter.gguf"
    args = ["to-gguf", str(base), str(lora), "-a", str(adapter), "--lora-only", "--ollama"]
    result = CliRunner().invoke(convert_cli, args)
    assert result.exit_code == 0, result.output
    lines = (lora.parent / "Modelfile").read_text().splitlines()
    assert lines[:2] == [f"FROM {base.resolve()}", "ADAPTER ./adapter.gguf"]
    result = CliRunner().invoke(convert_cli, args)
    assert result.exit_code != 0 and "exists (pass --overwrite to replace it)" in result.output

    result = CliRunner().invoke(convert_cli, ["to-gguf", str(folder), str(tmp_path / "x.gguf"), "-a", str(adapter),
                                              "--lora-only", "--ollama"])
    assert result.exit_code != 0 and "needs the base as a GGUF" in result.output
    assert not (tmp_path / "x.gguf").exists()  # refused before any work
