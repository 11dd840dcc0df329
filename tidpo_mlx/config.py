"""One config object: every knob of a run, the two TI-DPO presets, YAML loading.

The :class:`Config` defaults are what a bare ``tidpo-mlx train`` runs (and
what ``--help`` shows). A preset (``paper``, ``official``: :data:`PRESETS`)
and a recipe YAML are named overlays on them. Resolution order (later wins):
defaults < the preset the recipe or a flag names < recipe keys < command-line
flags; :func:`resolve_config` also says where each value came from. Unknown
or ill-typed keys are rejected by name. Names follow mlx-lm (``iters``,
``batch_size``, ``num_layers``, ``lora_parameters``, ...) and TRL's
``DPOTrainer`` (``beta``, ``loss_type``, ``max_length``, ...) so their
configs mostly just work.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from tidpo_mlx.errors import ConfigError
from tidpo_mlx.files import atomic_write_text
from tidpo_mlx.losses import LOSSES
from tidpo_mlx.reporting import parse_report_to

LossType = Literal["dpo", "ipo", "tdpo1", "tdpo2", "simpo"]
Weighting = Literal["none", "hybrid", "uniform", "random", "attribution", "prior", "softmax"]


class Switch(str, enum.Enum):
    """An ``auto | true | false`` setting: ``true`` and ``false`` insist, ``auto`` lets the run decide.

    Read it with :meth:`resolve` (or compare with the members); YAML, the
    command line and ``config.yaml`` spell it ``auto``, ``true``, ``false``.
    """

    AUTO = "auto"
    TRUE = "true"
    FALSE = "false"

    def resolve(self, auto: bool) -> bool:
        """The decision: ``auto`` when the setting is ``auto``, else what it insists on."""
        return auto if self is Switch.AUTO else self is Switch.TRUE

    def __str__(self) -> str:
        return self.value


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its ``--help`` text."""
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class LoRAParameters:
    """LoRA settings, in mlx-lm's convention (PEFT's ``lora_alpha`` = scale x rank)."""

    rank: int = _doc("LoRA rank r.", default=8)
    scale: float = _doc("LoRA scale (output = W x + scale * B A x).", default=20.0)
    dropout: float = _doc("Dropout on the LoRA input (training passes only).", default=0.0)
    keys: tuple[str, ...] = _doc(
        "Modules inside each block that get LoRA (e.g. self_attn.q_proj); empty: every linear layer of the "
        "block, fused ones included, as mlx-lm does (written out in adapter_config.json).",
        default=(),
    )


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face Hub dataset, in mlx-lm's ``hf_dataset`` keys (``validation`` is taken as valid)."""

    path: str = _doc("Hub dataset id (org/name).", default="")
    config: Optional[str] = _doc("Subset: the data files under a folder of this name.", default=None)
    train_split: Optional[str] = _doc("Split used for training, e.g. train or train[:1000].", default=None)
    valid_split: Optional[str] = _doc("Held-out split (default: valid/validation files, else made).", default=None)
    test_split: Optional[str] = _doc("Test split.", default=None)


@dataclass(frozen=True)
class Config:
    """Every setting of a run. The paper symbol of each method key is in its help."""

    # model and data
    model: str = _doc(
        "Built-in model name, Hugging Face id, local HF/MLX folder or .gguf file.",
        default="smollm2-135m-instruct",
    )
    data: str = _doc(
        "A folder of train/valid/test files (.jsonl, .jsonl.gz, .json, .parquet, or a datasets.save_to_disk "
        "folder), one such file (a held-out split is made), a bundled dataset name, or a Hub dataset id.",
        default="arith",
    )
    hf_dataset: Optional[HFDataset] = _doc(
        "Hub dataset (mlx-lm's keys: path, config, train_split, valid_split, test_split); wins over data.",
        default=None,
    )
    skip_invalid: bool = _doc(
        "Train on the valid rows when some are invalid (dropped rows are logged and counted).", default=False
    )
    valid_fraction: float = _doc(
        "Share of pairs held out (grouped by prompt, seeded) when the data has no valid split.", default=0.05
    )
    dataset_num_proc: Optional[int] = _doc(
        "Processes that encode the data (TRL's name); default: the CPU count (at most 8) for 16k rows or more.",
        default=None,
    )
    adapter_path: str = _doc("Where adapters, checkpoints and logs are written.", default="adapters")
    resume_adapter_file: Optional[str] = _doc(
        "Start from these adapter weights (an adapters.safetensors or its folder).", default=None
    )
    chat_template: str = _doc(
        "auto: the tokenizer's chat template; none: plain prompt + response text; or a .jinja template file.",
        default="auto",
    )
    max_length: int = _doc("Max tokens of prompt + response (TRL's name and default).", default=1024)
    max_prompt_length: int = _doc(
        "Max prompt tokens: earliest turns dropped first, then content cut from the left.", default=512
    )
    seed: int = _doc("Seed for LoRA init, batch order, sampling and random weights.", default=0)

    # training
    fine_tune_type: Literal["lora", "full"] = _doc(
        "lora, or full (every weight of the last num_layers blocks; reference = their original weights).",
        default="lora",
    )
    num_layers: int = _doc("LoRA on the last N transformer blocks (-1: all).", default=16)
    lora_parameters: LoRAParameters = _doc("rank, scale, dropout, keys.", default=LoRAParameters())
    optimizer: Literal["adamw", "rmsprop", "sgd", "adafactor"] = _doc(
        "Optimizer (the released TI-DPO code uses rmsprop).", default="adamw"
    )
    learning_rate: float = _doc("Peak learning rate.", default=5e-5)
    weight_decay: float = _doc("Weight decay (adamw, sgd).", default=0.0)
    lr_schedule: Literal["constant", "cosine", "linear"] = _doc(
        "Decay after warmup: constant, cosine or linear (to 0 at iters).", default="cosine"
    )
    warmup_steps: int = _doc("Linear warmup steps from 0 to the peak rate.", default=3)
    iters: int = _doc("Optimizer steps.", default=30)
    batch_size: int = _doc("Preference pairs per micro-batch.", default=4)
    grad_accumulation_steps: int = _doc("Micro-batches per optimizer step.", default=1)
    max_grad_norm: float = _doc("Clip the global gradient norm (0: off).", default=1.0)
    grad_checkpoint: Switch = _doc(
        "Recompute each block in the backward pass (memory for time): auto = when the weights plus the "
        "estimated activations and optimizer state of the largest micro-step would exceed 80% of MLX's memory "
        "limit.", default=Switch.AUTO
    )
    logits_chunk: int = _doc(
        "Response positions per chunk of the LM head and log-softmax, recomputed in the backward pass so the "
        "(rows x positions x vocabulary) logits are never all in memory (0: all at once).",
        default=256,
    )
    steps_per_eval: int = _doc("Held-out eval every N steps (0: before and after only).", default=0)
    val_batches: int = _doc(
        "Held-out batches of 2 x batch_size pairs per eval, spread evenly over the split (-1: all; 0: no held-out "
        "eval, the split is still set aside).", default=-1
    )
    sample_every: int = _doc(
        "Every N steps, append the policy's greedy answers to sample_prompts fixed held-out prompts to "
        "samples.jsonl, with their answer scores (TRL's LogCompletionsCallback; 0: off).", default=0
    )
    sample_prompts: int = _doc("Held-out prompts (the first N of the split) that sample_every answers.", default=4)
    steps_per_save: int = _doc("Checkpoint every N steps (0: only at the end).", default=10)
    save_total_limit: int = _doc("Checkpoints kept (oldest removed first).", default=2)
    clear_cache_threshold: int = _doc(
        "Clear MLX's buffer cache after a step, a held-out batch or an anchor sampling call when it holds more "
        "than this many bytes (mlx-lm's name and default; 0: whenever it holds any, so varying batch shapes "
        "cannot grow it).",
        default=0,
    )
    report_to: Optional[str] = _doc(
        "Also send every metrics.jsonl record to wandb and/or tensorboard (comma-separated, mlx-lm's "
        "--report-to; pip install 'tidpo-mlx[report]').",
        default=None,
    )
    project_name: Optional[str] = _doc(
        "W&B project for report_to wandb (mlx-lm's name; default: $WANDB_PROJECT, else W&B's own).", default=None
    )
    dequantize: Switch = _doc(
        "Compute with the frozen base dequantized: auto = on CPU yes, on GPU no.", default=Switch.AUTO
    )
    plain_attention: Switch = _doc(
        "Attention as plain ops that mx.compile shares between attribution and loss: auto = on CPU.",
        default=Switch.AUTO,
    )
    shared_prefix: Switch = _doc(
        "Run each pair's prompt once for its chosen/rejected/anchor rows: auto = where exact and supported.",
        default=Switch.AUTO,
    )

    # method (docs/method.md); a preset overlays these, a recipe's keys and flags win over it
    preset: Literal["none", "paper", "official"] = _doc(
        "TI-DPO preset laid over the defaults before the recipe's keys: paper (as the paper states it) or "
        "official (as the released code trains it), docs/method.md section 7; none: the defaults.",
        default="none",
    )
    loss_type: LossType = _doc("Preference loss: dpo, ipo, tdpo1, tdpo2, simpo.", default="dpo")
    weighting: Weighting = _doc(
        "Token weights: hybrid (TI-DPO), none, uniform, random, attribution, prior, softmax.",
        default="hybrid",
    )
    beta: float = _doc(
        "beta: scale of the margin in the sigmoid (paper preset: 0.1; the default is larger because sum1 weights "
        "make the margin about a per-token mean, docs/method.md section 3).",
        default=1.0,
    )
    alpha: float = _doc("alpha: weight of the sequential KL term (tdpo2).", default=0.5)
    lam: float = _doc("lambda: share of attribution vs Gaussian prior in w.", default=0.7)
    sigma_div: float = _doc("sigma = max(1, n / sigma_div) of the Gaussian prior.", default=4.0)
    weight_span: Literal["response", "sequence"] = _doc(
        "Span of attribution and prior: response or prompt+response.", default="response"
    )
    weight_norm: Literal["sum1", "mean1"] = _doc(
        "sum1: weights sum to 1 over the span; mean1: mean weight 1.", default="sum1"
    )
    gamma: float = _doc("gamma: weight of the triplet loss.", default=0.1)
    triplet_margin: float = _doc("Triplet margin (paper: unstated; we pick 1.0).", default=1.0)
    label_smoothing: float = _doc("Label smoothing eps of the dpo loss.", default=0.0)
    simpo_beta: float = _doc("SimPO beta.", default=2.0)
    simpo_gamma: float = _doc("SimPO gamma (margin).", default=1.0)
    anchor: Literal["sample", "policy", "none"] = _doc(
        "Triplet anchor: sample (a per-pair 'anchor' field in the data wins, the other "
        "pairs sample from the policy), policy (every anchor sampled from the current policy, "
        "data anchors ignored: docs/method.md section 5) or none (triplet term off: the default, as the "
        "anchor rows and the policy sampling make each step much slower; both presets turn it on).",
        default="none",
    )
    anchor_temperature: float = _doc("Anchor sampling temperature.", default=0.8)
    anchor_top_p: float = _doc("Anchor sampling top-p.", default=0.95)
    anchor_top_k: int = _doc("Anchor sampling top-k.", default=50)
    anchor_max_tokens: int = _doc("Anchor sampling: max new tokens.", default=64)
    anchor_every: int = _doc(
        "1: a fresh anchor every step (released code); K > 1: anchors for the next K steps "
        "sampled in one batched call (amortised; resume is exact when steps_per_save is a multiple of K).",
        default=1,
    )

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs the reference model (every loss but simpo)."""
        return LOSSES[self.loss_type].reference

    @property
    def triplet_on(self) -> bool:
        """Whether the triplet term is on: gamma > 0, a reference-based loss and an anchor source.

        Then every pair needs an anchor (its data ``anchor`` or a policy sample).
        """
        return self.gamma > 0 and self.uses_reference and self.anchor != "none"

    @property
    def uses_attribution(self) -> bool:
        """Whether the weights need the gradient attribution I."""
        return self.uses_reference and self.weighting in ("hybrid", "attribution", "softmax")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON friendly) of every key."""
        out = {k: v.value if isinstance(v, Switch) else v for k, v in dataclasses.asdict(self).items()}
        out["lora_parameters"]["keys"] = list(self.lora_parameters.keys)
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        loss_type="dpo",
        beta=0.1,
        lam=0.7,
        sigma_div=4.0,
        weight_span="response",
        weight_norm="sum1",
        gamma=0.1,
        triplet_margin=1.0,
        anchor="sample",
    ),
    "official": dict(
        loss_type="tdpo2",
        beta=0.2,
        alpha=0.5,
        lam=0.2,
        sigma_div=8.0,
        weight_span="sequence",
        weight_norm="mean1",
        gamma=0.001,
        triplet_margin=0.001,
        anchor="sample",
    ),
}
"""The presets' method keys (docs/method.md section 7), each a named overlay on the :class:`Config` defaults."""

REMOVED: dict[str, str] = {
    "steps_per_report": "the progress bar shows every step's loss and metrics.jsonl records every step",
}
"""Keys other tools (mlx-lm) or older versions accept that tidpo-mlx does not read: why, for the error."""

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_LORA_FIELDS = {f.name: f for f in dataclasses.fields(LoRAParameters)}


def _check_value(where: str, key: str, value: Any, annotation: Any) -> Any:
    """Coerce ``value`` to ``annotation`` or raise a ConfigError naming the key."""
    hint = typing.get_type_hints(Config).get(key) if annotation is None else annotation
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            value = str(value).lower()
        if value not in args:
            raise ConfigError(f"{where}: '{key}' must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is Switch:
        if isinstance(value, bool):
            value = str(value).lower()
        try:
            return Switch(value)
        except ValueError:
            raise ConfigError(f"{where}: '{key}' must be one of auto, true, false, got {value!r}") from None
    if hint is HFDataset:
        return _hf_dataset_from(where, key, value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: '{key}' must be a list of strings, got {value!r}")
        return tuple(value)
    raise ConfigError(f"{where}: '{key}' has an unsupported type")


def _hf_dataset_from(where: str, key: str, value: Any) -> HFDataset:
    """``hf_dataset`` from a mapping of mlx-lm's keys, or a Hub id string (``--hf-dataset org/name``)."""
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a mapping (path, config, train_split, ...) or a Hub id")
    fields = {f.name for f in dataclasses.fields(HFDataset)}
    for name, val in value.items():
        if name not in fields:
            raise _unknown(where, f"{key}.{name}", [f"{key}.{f}" for f in fields])
        if val is not None and not isinstance(val, str):
            raise ConfigError(f"{where}: '{key}.{name}' must be a string, got {val!r}")
    if not value.get("path"):
        raise ConfigError(f"{where}: '{key}.path' (the Hub dataset id) is required")
    return HFDataset(**value)


def _unknown(where: str, key: str, known: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _lora_from(where: str, value: Any, base: LoRAParameters) -> LoRAParameters:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'lora_parameters' must be a mapping")
    hints = typing.get_type_hints(LoRAParameters)
    updates = {}
    for key, val in value.items():
        if key not in _LORA_FIELDS:
            raise _unknown(where, f"lora_parameters.{key}", [f"lora_parameters.{k}" for k in _LORA_FIELDS])
        updates[key] = _check_value(where, f"lora_parameters.{key}", val, hints[key])
    return dataclasses.replace(base, **updates)


def _validate(cfg: Config, where: str) -> None:
    positive = ["max_length", "max_prompt_length", "batch_size", "grad_accumulation_steps"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{where}: '{key}' must be > 0")
    if cfg.anchor_every < 1 or cfg.anchor_max_tokens < 1:
        raise ConfigError(f"{where}: 'anchor_every' and 'anchor_max_tokens' must be >= 1")
    if cfg.iters < 0 or cfg.warmup_steps < 0 or cfg.logits_chunk < 0:
        raise ConfigError(f"{where}: 'iters', 'warmup_steps' and 'logits_chunk' must be >= 0")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ConfigError(f"{where}: 'max_prompt_length' must be < 'max_length'")
    if cfg.chat_template not in ("auto", "none"):
        if not cfg.chat_template.endswith(".jinja") or not Path(cfg.chat_template).expanduser().is_file():
            raise ConfigError(f"{where}: 'chat_template' must be auto, none or an existing .jinja file, "
                              f"got {cfg.chat_template!r}")
    if not 0.0 < cfg.valid_fraction < 1.0:
        raise ConfigError(f"{where}: 'valid_fraction' must be in (0, 1)")
    if cfg.dataset_num_proc is not None and cfg.dataset_num_proc < 1:
        raise ConfigError(f"{where}: 'dataset_num_proc' must be at least 1")
    if not 0.0 <= cfg.lam <= 1.0:
        raise ConfigError(f"{where}: 'lam' must be in [0, 1]")
    if cfg.sigma_div <= 0 or cfg.beta <= 0 or cfg.learning_rate <= 0:
        raise ConfigError(f"{where}: 'sigma_div', 'beta' and 'learning_rate' must be > 0")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"{where}: 'label_smoothing' must be in [0, 0.5)")
    if cfg.lora_parameters.rank <= 0:
        raise ConfigError(f"{where}: 'lora_parameters.rank' must be > 0")
    if not 0.0 <= cfg.lora_parameters.dropout < 1.0:
        raise ConfigError(f"{where}: 'lora_parameters.dropout' must be in [0, 1)")
    for key in ("gamma", "triplet_margin", "alpha"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{where}: '{key}' must be >= 0, got {getattr(cfg, key)}")
    if not 0.0 < cfg.anchor_top_p <= 1.0:
        raise ConfigError(f"{where}: 'anchor_top_p' must be in (0, 1], got {cfg.anchor_top_p}")
    if cfg.num_layers == 0 or cfg.num_layers < -1:
        raise ConfigError(f"{where}: 'num_layers' must be >= 1, or -1 for every block, got {cfg.num_layers}")
    if cfg.sample_every < 0 or cfg.sample_prompts < 1:
        raise ConfigError(f"{where}: 'sample_every' must be >= 0 and 'sample_prompts' >= 1")
    if cfg.save_total_limit < 1:
        raise ConfigError(f"{where}: 'save_total_limit' must be >= 1 (checkpoints kept), got {cfg.save_total_limit}")
    if cfg.clear_cache_threshold < 0:
        raise ConfigError(f"{where}: 'clear_cache_threshold' must be >= 0 (bytes), got {cfg.clear_cache_threshold}")
    parse_report_to(cfg.report_to, where)
    spec = LOSSES[cfg.loss_type]
    if not spec.token_weights and cfg.weighting != "none":
        raise ConfigError(
            f"{where}: 'weighting' must be none with loss_type {cfg.loss_type} (it takes no token weights), "
            f"got {cfg.weighting!r}"
        )
    if not spec.label_smoothing and cfg.label_smoothing:
        smoothed = ", ".join(k for k, s in LOSSES.items() if s.label_smoothing)
        raise ConfigError(
            f"{where}: 'label_smoothing' applies only to loss_type {smoothed}, not {cfg.loss_type} (set it to 0)"
        )


@dataclass(frozen=True)
class Resolved:
    """A resolved :class:`Config` and where each value that a preset, recipe or flag set came from."""

    config: Config
    origins: dict[str, str]
    """Flat key (``beta``, ``lora_parameters.rank``) -> ``preset paper``, ``recipe <name>`` or ``command line``."""

    def changed(self) -> dict[str, tuple[Any, str]]:
        """The flat keys whose value differs from the :class:`Config` default: ``(value, origin)``."""
        default, now = flat_dict(Config().to_dict()), flat_dict(self.config.to_dict())
        out = {}
        for key, value in now.items():
            if key not in default or default[key] != value:
                out[key] = (value, self.origins[key] if key in self.origins else self.origins[key.split(".")[0]])
        return out


def flat_dict(values: dict[str, Any]) -> dict[str, Any]:
    """``{"lora_parameters": {"rank": 8}}`` as ``{"lora_parameters.rank": 8}`` (one level of nesting)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def resolve(
    recipe: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    where: str = "config",
    label: str | None = None,
) -> Resolved:
    """Resolve defaults < preset < ``recipe`` < ``overrides`` into a validated Config, with each value's origin.

    The preset is the one ``overrides`` or else ``recipe`` names (none: no
    overlay). ``where`` names the recipe file in error messages, ``label`` the
    recipe in the origins (default: ``where``). Flat override keys
    ``lora_rank``/``lora_scale``/``lora_dropout``/``lora_keys`` address
    ``lora_parameters``; ``None`` override values are not given.
    """
    recipe = dict(recipe or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    preset = overrides.get("preset", recipe.get("preset", Config.preset))
    if not isinstance(preset, str) or (preset != "none" and preset not in PRESETS):
        source = "command line" if "preset" in overrides else where
        raise ConfigError(f"{source}: unknown preset {preset!r} (known: none, {', '.join(PRESETS)})")
    values: dict[str, Any] = dict(PRESETS.get(preset, {}))
    origins = {key: f"preset {preset}" for key in values}
    lora = LoRAParameters()
    sources = ((where, f"recipe {label or where}", recipe), ("command line", "command line", overrides))
    for source, origin, mapping in sources:
        for key, value in mapping.items():
            if key.startswith("lora_") and key[5:] in _LORA_FIELDS:
                lora = _lora_from(source, {key[5:]: value}, lora)
                origins[f"lora_parameters.{key[5:]}"] = origin
            elif key == "lora_parameters":
                lora = _lora_from(source, value, lora)
                origins.update({f"lora_parameters.{k}": origin for k in value})
            elif key in REMOVED:
                raise ConfigError(f"{source}: '{key}' is not a tidpo-mlx key ({REMOVED[key]}): remove it")
            elif key not in _FIELDS:
                raise _unknown(source, key, list(_FIELDS) + [f"lora_{k}" for k in _LORA_FIELDS])
            else:
                values[key] = _check_value(source, key, value, None)
                origins[key] = origin
    cfg = Config(**values, lora_parameters=lora)
    _validate(cfg, where)
    return Resolved(cfg, origins)


def build_config(
    recipe: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    where: str = "config",
) -> Config:
    """The validated Config of defaults < preset < ``recipe`` < ``overrides`` (see :func:`resolve`)."""
    return resolve(recipe, overrides, where).config


def builtin_recipe_path(name: str) -> Path:
    """Path of a recipe shipped in the package (``recipes/<name>.yaml``)."""
    return Path(str(resources.files("tidpo_mlx.recipes") / f"{name}.yaml"))


def recipe_file(spec: str | Path) -> Path:
    """The file of a recipe given as a path or as the name of a bundled recipe (``paper``)."""
    path = Path(spec)
    return builtin_recipe_path(str(spec)) if not path.exists() and not path.suffix else path


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file (a path, or the name of a bundled recipe)."""
    p = recipe_file(path)
    if not p.exists():
        raise ConfigError(f"{path}: recipe not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{line}: invalid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of keys to values")
    return data


def resolve_config(recipe_path: str | Path | None, overrides: dict[str, Any] | None = None) -> Resolved:
    """What a command resolves: the defaults, overlaid by a recipe (path or bundled name; none: no
    recipe) and its preset, then the command-line ``overrides``, with each value's origin."""
    if not recipe_path:
        return resolve(None, overrides)
    path = recipe_file(recipe_path)
    return resolve(load_recipe(path), overrides, where=str(path), label=str(recipe_path))


def load_config(recipe_path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """The Config of the defaults, a recipe (none: the defaults alone) and CLI overrides."""
    return resolve_config(recipe_path, overrides).config


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
