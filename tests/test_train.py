"""End-to-end training on a tiny model: adapters, mlx-lm loading, resume, NaN, CLI errors."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from tidpo_mlx.cli import main
from tidpo_mlx.config import build_config
from tidpo_mlx.trainer import TrainingError, train

from conftest import arith_folder, arith_rows, write_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return arith_folder(tmp_path_factory.mktemp("pairs"), 16, 6)


def _cfg(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), adapter_path=str(out), iters=3, batch_size=2, num_layers=2,
                learning_rate=1e-3, warmup_steps=1, anchor="sample", anchor_max_tokens=6, steps_per_save=2)
    base.update(kw)
    return build_config(base)


def test_three_steps_write_adapters_that_load_in_mlx_lm(tiny_model, data_dir, tmp_path):
    from mlx_lm import load

    out = tmp_path / "ad"
    result = train(_cfg(tiny_model, data_dir, out), log=lambda s: None, progress=False)
    assert (out / "adapters.safetensors").exists() and (out / "config.yaml").exists()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "split" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss", "loss/pref", "loss/triplet", "rewards/chosen", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "weights/entropy", "grad_norm", "lr", "tokens_per_s", "peak_memory_gb"):
        assert key in steps[-1]
    assert result.before["rewards/accuracies"] == 0.0 and "policy_preference_accuracy" in result.after

    tokens = mx.array([[1, 5, 9, 30, 31, 2]])
    base, _ = load(str(tiny_model))
    tuned, _ = load(str(tiny_model), adapter_path=str(out))
    diff = np.abs(np.array(tuned(tokens)) - np.array(base(tokens))).max()
    assert diff > 1e-4


def test_val_batches_zero_skips_the_held_out_pass_and_says_so(tiny_model, data_dir, tmp_path):
    out = tmp_path / "noval"
    lines: list[str] = []
    result = train(_cfg(tiny_model, data_dir, out, iters=2, val_batches=0, steps_per_eval=1), log=lines.append,
                   progress=False)
    assert result.before is None and result.after is None
    assert any(line.startswith("held-out: skipped (val_batches 0") for line in lines)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and not any("split" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"] is None and summary["after"] is None


def test_resume_equals_uninterrupted_run(tiny_model, data_dir, tmp_path):
    full = _cfg(tiny_model, data_dir, tmp_path / "full", iters=4)
    train(full, log=lambda s: None, progress=False)

    cut = dataclasses.replace(full, adapter_path=str(tmp_path / "cut"))

    def stop(step, _):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cut, log=lambda s: None, progress=False, on_step=stop)
    assert (tmp_path / "cut" / "checkpoints" / "step-000002").is_dir()
    train(cut, resume="", log=lambda s: None, progress=False)

    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-5, atol=1e-7)
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "split" not in json.loads(l)]
    assert steps == [1, 2, 3, 4]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_model, data_dir, tmp_path):
    cfg = _cfg(tiny_model, data_dir, tmp_path / "nan", iters=6, learning_rate=1e30, warmup_steps=0,
               max_grad_norm=0.0, steps_per_save=1, save_total_limit=10)
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step \d+ \(batch starting at .*train.jsonl:\d+"):
        train(cfg, log=lambda s: None, progress=False)
    kept = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert kept and all(name.startswith("step-") for name in kept)
    last = mx.load(str(tmp_path / "nan" / "checkpoints" / kept[-1] / "adapters.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in last.values())


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "/no/such/model: not a model folder"),
    (["--preset", "nope"], "Invalid value for '--preset'"),
    (["--beta", "abc"], "Invalid value for '--beta'"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    result = CliRunner().invoke(main, ["train", "--adapter-path", str(tmp_path / "x")] + args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_recipe_errors_name_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("betta: 0.2\n")
    result = CliRunner().invoke(main, ["train", "-c", str(recipe)])
    assert result.exit_code != 0
    assert f"{recipe}: unknown key 'betta' (did you mean 'beta'?)" in result.output
    recipe.write_text("preset: nope\n")
    result = CliRunner().invoke(main, ["train", "-c", str(recipe)])
    assert "unknown preset 'nope'" in result.output
    recipe.write_text("lora_parameters: {rank: two}\n")
    result = CliRunner().invoke(main, ["train", "-c", str(recipe)])
    assert "'lora_parameters.rank' must be an integer" in result.output


def test_full_fine_tune_with_rmsprop_keeps_the_original_as_reference(tiny_model, data_dir, tmp_path):
    from mlx_lm import load

    from tidpo_mlx.models import load_adapted

    out = tmp_path / "full"
    cfg = _cfg(tiny_model, data_dir, out, fine_tune_type="full", optimizer="rmsprop", num_layers=1,
               learning_rate=1e-3, anchor="none")
    train(cfg, log=lambda s: None, progress=False)
    saved = mx.load(str(out / "adapters.safetensors"))
    assert saved and all(k.startswith("model.layers.1.") for k in saved)
    tokens = mx.array([[1, 5, 9, 30, 31, 2]])
    base, _ = load(str(tiny_model))
    tuned, _, _, reference = load_adapted(str(tiny_model), str(out), cfg)
    tuned_logits = np.array(tuned(tokens))
    assert np.abs(tuned_logits - np.array(base(tokens))).max() > 1e-4
    with reference.active():
        np.testing.assert_allclose(np.array(tuned(tokens)), np.array(base(tokens)), atol=1e-5)
    np.testing.assert_array_equal(np.array(tuned(tokens)), tuned_logits)
    via_mlx_lm, _ = load(str(tiny_model), adapter_path=str(out))
    np.testing.assert_allclose(np.array(via_mlx_lm(tokens)), tuned_logits, atol=1e-5)


def _summed_logp(model, prompt: list[int], response: list[int]) -> float:
    """``log p(response | prompt)`` from one plain forward of the whole sequence."""
    logits = model(mx.array([prompt + response]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    positions = mx.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return float(logp[positions, mx.array(response)].sum())


@pytest.mark.parametrize("optimizer", ["sgd", "adafactor"])
def test_other_optimizers_train(tiny_model, data_dir, tmp_path, optimizer):
    """The held-out rewards the run reports are those of its saved adapters, recomputed with mlx-lm:
    ``beta * (log pi(y|x) - log ref(y|x))`` per response, accuracy the share of pairs whose chosen reward is higher."""
    from mlx_lm import load

    from tidpo_mlx.data import load_dataset

    cfg = _cfg(tiny_model, data_dir, tmp_path / optimizer, optimizer=optimizer, iters=2, anchor="none")
    result = train(cfg, log=lambda s: None, progress=False)
    base, tok = load(str(tiny_model))
    tuned, _ = load(str(tiny_model), adapter_path=str(result.adapter_path))
    pairs = load_dataset(str(data_dir), tok, cfg).valid
    rewards = np.array([[cfg.beta * (_summed_logp(tuned, p.prompt, y) - _summed_logp(base, p.prompt, y))
                         for y in (p.chosen, p.rejected)] for p in pairs])
    margins = rewards[:, 0] - rewards[:, 1]
    assert len(pairs) == 6 and np.abs(margins).max() > 1e-3  # the adapters changed the rewards
    after = result.after
    np.testing.assert_allclose([after["rewards/chosen"], after["rewards/rejected"], after["rewards/margins"]],
                               [rewards[:, 0].mean(), rewards[:, 1].mean(), margins.mean()], rtol=1e-3, atol=1e-5)
    tie = 1e-5  # a pair this close to a tie may land either way
    assert (margins > tie).mean() <= after["rewards/accuracies"] <= (margins > -tie).mean()


def test_amortised_anchors_sample_once_per_block(tiny_model, data_dir, tmp_path, monkeypatch):
    from tidpo_mlx import anchors as anchors_module

    calls = []
    real = anchors_module.sample_anchors

    def counting(model, tokenizer, encoder, examples, cfg, step):
        calls.append(len(examples))
        return real(model, tokenizer, encoder, examples, cfg, step)

    monkeypatch.setattr(anchors_module, "sample_anchors", counting)
    cfg = _cfg(tiny_model, data_dir, tmp_path / "am", iters=4, anchor_every=2)
    train(cfg, log=lambda s: None, progress=False)
    assert calls == [4, 4]


def _sampling(tiny_model, data_dir, max_tokens, n_pairs):
    """Config (hot, unfiltered sampler), model, tokenizer, encoder and the first training pairs."""
    from tidpo_mlx.data import PairEncoder, load_dataset
    from tidpo_mlx.models import load_base

    cfg = _cfg(tiny_model, data_dir, "unused", anchor_max_tokens=max_tokens, anchor_temperature=1.5,
               anchor_top_k=0, anchor_top_p=1.0)
    model, tok, _ = load_base(tiny_model)
    return cfg, model, tok, PairEncoder(tok, cfg), load_dataset(str(data_dir), tok, cfg).train[:n_pairs]


def test_anchor_draw_depends_on_pair_not_batch(tiny_model, data_dir):
    from tidpo_mlx.anchors import sample_anchors

    cfg, model, tok, enc, pairs = _sampling(tiny_model, data_dir, 12, 4)
    together = sample_anchors(model, tok, enc, pairs, cfg, step=3)
    alone = [sample_anchors(model, tok, enc, [p], cfg, step=3)[0] for p in reversed(pairs)][::-1]
    assert together == alone
    assert sample_anchors(model, tok, enc, pairs, cfg, step=4) != together
    assert len({tuple(a) for a in together}) > 1


def test_anchor_policy_ignores_data_anchors_and_sample_keeps_them(tiny_model, data_dir, tmp_path):
    """anchor: sample uses a pair's data anchor as is; anchor: policy samples it exactly as for a pair
    without one; training logs how many anchors come from each."""
    from tidpo_mlx.anchors import sample_anchors

    cfg, model, tok, enc, pairs = _sampling(tiny_model, data_dir, 12, 4)
    with_data = [dataclasses.replace(p, anchor=[5, 6, 7]) for p in pairs]
    without = [dataclasses.replace(p, anchor=None) for p in pairs]
    assert sample_anchors(model, tok, enc, with_data, cfg, step=3) == [[5, 6, 7]] * 4
    policy = dataclasses.replace(cfg, anchor="policy")
    assert policy.triplet_on
    sampled = sample_anchors(model, tok, enc, with_data, policy, step=3)
    assert sampled == sample_anchors(model, tok, enc, without, cfg, step=3)
    assert all(a != [5, 6, 7] for a in sampled)

    rows = [{**r, "anchor": "The answer is 3."} for r in arith_rows(8, 0)]
    folder = tmp_path / "anchored"
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "valid.jsonl", arith_rows(4, 1))
    for mode, want in (("sample", "8 anchors from the data, 0 sampled"), ("policy", "0 anchors from the data, 8 sampled")):
        lines: list[str] = []
        train(_cfg(tiny_model, folder, tmp_path / mode, iters=1, anchor=mode), log=lines.append, progress=False)
        assert any(want in line for line in lines), lines


def test_anchor_decoding_stops_past_the_overlap_with_the_same_tokens(tiny_model, data_dir, monkeypatch):
    """Decoding stops SLACK tokens past max(len y_w, len y_l); what the triplet sees (the first
    `overlap` tokens) is what a full-length sample with the same keys gives."""
    from tidpo_mlx import anchors as anchors_module

    cfg, model, tok, enc, pairs = _sampling(tiny_model, data_dir, 64, 3)
    short = anchors_module.sample_anchors(model, tok, enc, pairs, cfg, step=2)
    monkeypatch.setattr(anchors_module, "SLACK", cfg.anchor_max_tokens)
    full = anchors_module.sample_anchors(model, tok, enc, pairs, cfg, step=2)
    assert any(len(a) < len(f) for a, f in zip(short, full))
    for p, a, f in zip(pairs, short, full):
        assert a == f or len(a) < len(f)
        assert a[: p.overlap] == f[: p.overlap]
