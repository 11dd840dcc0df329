"""Shared fixtures: tiny random MLX models with a real (locally trained) tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few
sentences, with a ChatML chat template like SmolLM2's (default system prompt
included), and the models are mlx-lm ``llama`` / ``qwen2`` with random weights.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import tidpo_mlx

tidpo_mlx.setup()  # before anything imports mlx: the fast BLAS takes effect only then

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import pytest  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from tidpo_mlx import data_cache  # noqa: E402

# Tests never write to the user's encoded-dataset cache; tests/test_data_cache.py turns it on in a tmp folder.
os.environ.setdefault(data_cache.DISABLE, "1")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "What is 12 plus 30? The answer is 42.",
    "Convert 3 km to metres: 3 km = 3000 m.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "A train leaves at 9:15 and arrives 2 hours later, at 11:15.",
    "Prices: 4 apples cost 8 dollars, so one apple costs 2 dollars.",
    "You are a tiny test model. Please answer briefly and correctly.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tokenizer(folder: Path, vocab_size: int = 320) -> int:
    """Train a byte-level BPE tokenizer and save it as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": CHATML_TEMPLATE,
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "model_max_length": 2048,
            }
        )
    )
    return tok.get_vocab_size()


def make_tiny_model(
    folder: Path,
    model_type: str = "llama",
    quantize: bool = False,
    seed: int = 0,
    num_layers: int = 2,
) -> Path:
    """Write a tiny random mlx-lm model (config, weights, tokenizer) to ``folder``."""
    from mlx_lm.utils import _get_classes

    vocab = write_tokenizer(folder)
    config = {
        "model_type": model_type,
        "architectures": ["LlamaForCausalLM" if model_type == "llama" else "Qwen2ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": num_layers,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        "bos_token_id": None,
        "pad_token_id": 0,
    }
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    mx.eval(model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny fp32 llama with a ChatML template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_quantized_model(tmp_path_factory) -> Path:
    """The same tiny llama, 4-bit affine quantized (group size 32)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-q4"), quantize=True)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A tiny qwen2 (attention biases, untied head off) with a ChatML template."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), model_type="qwen2", seed=1)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write rows as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arith_rows(n: int, seed: int) -> list[dict]:
    """``n`` seeded addition pairs (the right sum chosen, a near miss rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
                     "rejected": f"The answer is {a + b + rng.choice([1, 2, 10])}."})
    return rows


def arith_folder(folder: Path, train: int, valid: int) -> Path:
    """A data folder of ``train`` / ``valid`` :func:`arith_rows` (seeds 0 and 1)."""
    write_jsonl(folder / "train.jsonl", arith_rows(train, 0))
    write_jsonl(folder / "valid.jsonl", arith_rows(valid, 1))
    return folder
