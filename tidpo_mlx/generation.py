"""Generation for evaluation: the pairs' prompts as ``mlx_lm.generate`` builds them, decoded in batches.

The prompt of a pair is its prompt messages rendered with the model's chat
template and generation prompt, then tokenised without special tokens,
exactly as ``mlx_lm.generate --prompt`` (with ``--system-prompt`` for a
leading system message) does; a prompt that training had to cut
(``max_prompt_length``) keeps training's tokens. Decoding is mlx-lm's
``BatchGenerator`` with the model's end-of-sequence ids as stop tokens. Greedy
decoding takes the arg-max; sampling draws token ``t`` of sample ``j`` of
pair ``i`` with its own key (from the run ``seed``, ``i``, ``j`` and ``t``),
so a sample depends on neither the batch it is in nor the arm (base and
tuned share their draws' keys), and a rerun repeats it.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from typing import Any, Callable, ContextManager, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator

from tidpo_mlx.anchors import filter_logits
from tidpo_mlx.config import Config
from tidpo_mlx.data import Example
from tidpo_mlx.errors import ConfigError
from tidpo_mlx.models import eval_mode
from tidpo_mlx.seeds import derive_seed

GENERATION = 53
"""Purpose of the seed of one generated sample (``seeds.derive_seed``)."""
ARMS = ("base", "tuned")
"""What is generated with: the base model (adapters off) and the model with its adapters."""


@dataclass(frozen=True)
class Decoding:
    """How generations are decoded: samples per prompt, temperature (0: greedy), top-p, new tokens, seed."""

    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int = 0

    def check(self) -> None:
        """One-line errors for values that cannot decode."""
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be 0 (greedy) or more, got {self.temperature:g}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p:g}")
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ConfigError(f"--num-samples {self.num_samples} with --temperature 0: greedy samples are all the "
                              "same; give a temperature (e.g. 0.7)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prompt:
    """One pair's generation prompt: token ids, and the ``mlx_lm.generate`` flags that build the same
    ids (None where that command cannot: multi-turn, cut by training, custom template)."""

    ids: list[int]
    cli: list[str] | None


def _cli_flags(messages: Sequence[dict[str, Any]], cfg: Config, has_template: bool) -> list[str] | None:
    roles = [m["role"] for m in messages]
    if roles not in (["user"], ["system", "user"]) or cfg.chat_template not in ("auto", "none"):
        return None
    if any("\\n" in m["content"] or "\\t" in m["content"] for m in messages):
        return None  # mlx_lm.generate turns a written \n into a newline
    flags = ["--prompt", messages[-1]["content"]]
    if roles[0] == "system":
        if cfg.chat_template == "none":
            return None
        flags = ["--system-prompt", messages[0]["content"]] + flags
    if cfg.chat_template == "none" and has_template:
        flags.append("--ignore-chat-template")
    return flags


def generation_prompt(tokenizer: Any, example: Example, cfg: Config, template: str | None = None) -> Prompt:
    """The ids ``mlx_lm.generate`` feeds the model for this pair's prompt (see the module docstring)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    has_template = bool(getattr(hf, "chat_template", None))
    if example.prompt_truncated:
        return Prompt(list(example.prompt), None)
    messages = example.messages
    if cfg.chat_template == "none":
        ids = hf.encode("\n\n".join(m["content"] for m in messages), add_special_tokens=True)
    else:
        kwargs = {"chat_template": template} if template is not None else {}
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        ids = hf.encode(text, add_special_tokens=False)
    return Prompt(list(ids), _cli_flags(messages, cfg, has_template))


def reproduce_command(model_path: str, adapter_path: str | None, prompt: Prompt, decoding: Decoding) -> str | None:
    """The ``mlx_lm.generate`` command line that decodes ``prompt`` with the same weights, or None."""
    if prompt.cli is None:
        return None
    words = ["mlx_lm.generate", "--model", model_path]
    if adapter_path is not None:
        words += ["--adapter-path", adapter_path]
    words += prompt.cli + ["--max-tokens", str(decoding.max_tokens), "--temp", f"{decoding.temperature:g}"]
    if not decoding.greedy:
        words += ["--top-p", f"{decoding.top_p:g}", "--seed", str(decoding.seed)]
    return shlex.join(words)


def sample_seed(seed: int, pair_index: int, sample: int) -> int:
    """Seed of sample ``sample`` of pair ``pair_index`` (shared by base and tuned)."""
    return derive_seed(seed, pair_index * 1_009 + sample, GENERATION)


def keyed_sampler(decoding: Decoding, seed: int) -> Callable[[mx.array], mx.array]:
    """Temperature and top-p sampling with its own key for each token: token ``t`` uses
    ``derive_seed(0, t, seed)`` (top-p keeps, most likely first, the tokens whose more likely
    ones hold less than ``top_p``, as ``anchors.filter_logits`` does)."""
    counter = [0]

    def sampler(logprobs: mx.array) -> mx.array:
        key = mx.random.key(derive_seed(0, counter[0], seed))
        counter[0] += 1
        logits, ids = filter_logits(logprobs * (1.0 / decoding.temperature), 0, decoding.top_p)
        pick = mx.random.categorical(logits, key=key)
        return pick if ids is None else mx.take_along_axis(ids, pick[..., None], axis=-1)[..., 0]

    return sampler


def shared_prefix(prompts: Sequence[list[int]]) -> int:
    """Tokens every prompt starts with (the chat template's head, a default system prompt), leaving each
    prompt at least one token of its own."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return max(n, 0)


def prefix_caches(model: nn.Module, prefix: list[int], copies: int) -> list[list[Any]] | None:
    """``copies`` prompt caches that each hold ``prefix`` already run through ``model`` (computed once), or
    None where the model's cache is not mlx-lm's plain ``KVCache`` (sliding windows, state-space layers)."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    cache = make_prompt_cache(model)
    if not prefix or any(type(c) is not KVCache for c in cache):
        return None
    model(mx.array([prefix]), cache=cache)
    mx.eval([c.state for c in cache])
    out = []
    for _ in range(copies):
        layers = []
        for c in cache:
            copy = KVCache()
            copy.keys, copy.values, copy.offset = c.keys[..., :c.offset, :], c.values[..., :c.offset, :], c.offset
            layers.append(copy)
        out.append(layers)
    return out


PREFIX_FROM = 8
"""Shortest shared prompt prefix that :func:`decode` runs once for the whole batch."""


def decode(model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], decoding: Decoding,
           seeds: Sequence[int]) -> list[list[int]]:
    """Generated token ids (stop token left out) for each prompt, all decoded in one batch.

    The tokens all prompts share (:func:`shared_prefix`, from
    :data:`PREFIX_FROM` on) run once and their key/value cache is given to
    every prompt (mlx-lm's prompt caches), so each prompt's prefill is only
    its own tokens. ``seeds`` (one per prompt) key the samplers; greedy
    decoding ignores them.
    """
    n = shared_prefix(prompts) if len(prompts) > 1 else 0
    caches = prefix_caches(model, list(prompts[0][:n]), len(prompts)) if n >= PREFIX_FROM else None
    inputs = [list(p[n:]) for p in prompts] if caches is not None else list(prompts)
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         completion_batch_size=len(prompts), prefill_batch_size=len(prompts))
    try:
        samplers = None if decoding.greedy else [keyed_sampler(decoding, s) for s in seeds]
        uids = gen.insert(inputs, max_tokens=[decoding.max_tokens] * len(prompts), caches=caches, samplers=samplers)
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
    finally:
        gen.close()
    mx.clear_cache()
    return [tokens[uid] for uid in uids]


def generate_arms(model: nn.Module, tokenizer: Any, examples: Sequence[Example], prompts: Sequence[Prompt],
                  decoding: Decoding, arms: Sequence[str],
                  reference: Callable[[], ContextManager[None]]) -> dict[str, list[list[list[int]]]]:
    """For each arm, each pair's ``num_samples`` generations as token ids: ``out[arm][pair][sample]``.

    ``base`` runs inside ``reference()`` (the model's reference, adapters
    off: ``models.Reference.active``), ``tuned`` with the adapters on; both
    in eval mode (no dropout).
    """
    n = decoding.num_samples
    flat = [p.ids for p in prompts for _ in range(n)]
    seeds = [sample_seed(decoding.seed, ex.index, j) for ex in examples for j in range(n)]
    out = {}
    with eval_mode(model):
        for arm in arms:
            if arm == "base":
                with reference():
                    tokens = decode(model, tokenizer, flat, decoding, seeds)
            else:
                tokens = decode(model, tokenizer, flat, decoding, seeds)
            out[arm] = [tokens[i * n:(i + 1) * n] for i in range(len(examples))]
    return out
