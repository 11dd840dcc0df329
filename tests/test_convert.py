"""Converters: HF -> MLX (quantize, rope fix), MLX adapters <-> PEFT, fused HF export.

Every comparison runs the same tokens through MLX (mlx-lm, with the adapter) and
through torch (transformers, with PEFT or the fused weights) and asserts the largest
logit difference is below a stated fraction of the logit scale (max |logit|).
"""

from __future__ import annotations

import json
from pathlib import Path

import tidpo_mlx  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load

from conftest import make_tiny_model
from tidpo_mlx.convert.cli import convert as convert_cli
from tidpo_mlx.convert.fuse import fuse
from tidpo_mlx.convert.hf import fix_rope_config, hf_to_mlx
from tidpo_mlx.convert.peft import from_peft, to_peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj"]
TOL = 1e-4  # fraction of the logit scale for fp32 comparisons


def make_adapter(model_path, folder, *, num_layers=2, keys=KEYS, rank=4, scale=2.0, seed=0, model_id=None):
    """Random mlx-lm LoRA adapter with NON-ZERO lora_b, saved like mlx-lm's trainer does."""
    model, _ = load(str(model_path))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)}
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(seed)
    weights = {k: 0.2 * mx.random.normal(v.shape) for k, v in tree_flatten(model.trainable_parameters())}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": params,
        "model": str(model_path),
        "base_model_name_or_path": model_id or str(model_path),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=4))
    return folder


def prompt_ids(model_path, text="What is 12 plus 30? Convert 3 km to metres."):
    _, tok = load(str(model_path))
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def mlx_logits(model_path, ids, adapter_path=None, float32=False):
    model, _ = load(str(model_path), adapter_path=str(adapter_path) if adapter_path else None)
    if float32:  # compute in fp32; quantized weights stay 4-bit (their fp16 scales upcast exactly)
        model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                              model.parameters()))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def hf_model(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def assert_close(name, ref, got, tol=TOL):
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ref - got).max())
    print(f"{name}: max |diff| {diff:.3g} on logit scale {scale:.3g} ({diff / scale:.2g} of scale, tol {tol:g})")
    assert diff < tol * scale, f"{name}: {diff} >= {tol} * {scale}"
    return diff, scale


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_and_adapter(request, tmp_path_factory):
    """The tiny model (the MLX folder doubles as the HF copy: fp32, HF names) and an adapter."""
    model = request.getfixturevalue("tiny_model" if request.param == "llama" else "tiny_qwen2")
    adapter = make_adapter(model, tmp_path_factory.mktemp(f"adapter-{request.param}"), seed=7)
    return request.param, model, adapter


# (a) PEFT vs MLX ------------------------------------------------------------------------


def test_to_peft_matches_mlx_logits(base_and_adapter, tmp_path):
    arch, model, adapter = base_and_adapter
    out = to_peft(adapter, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["layers_to_transform"] == [0, 1]
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"]

    ids = prompt_ids(model)
    ref = mlx_logits(model, ids, adapter)
    base = mlx_logits(model, ids)
    assert np.abs(ref - base).max() > 0.1 * np.abs(ref).max()  # the adapter matters

    pm = peft.PeftModel.from_pretrained(hf_model(model), str(out)).eval()
    assert_close(f"PEFT vs MLX ({arch})", ref, torch_logits(pm, ids))


# (b) fused export vs MLX --------------------------------------------------------------


def test_fuse_loads_in_transformers(base_and_adapter, tmp_path):
    arch, model, adapter = base_and_adapter
    out = fuse(model, adapter, tmp_path / "fused")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["tie_word_embeddings"] is True and "quantization" not in cfg
    ids = prompt_ids(model)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 30? Convert 3 km to metres."}],
                                   add_generation_prompt=True, return_dict=False) == ids
    assert_close(f"fused HF vs MLX+adapter ({arch})", mlx_logits(model, ids, adapter), torch_logits(hf_model(out), ids))


def test_fuse_quantized_base(tiny_quantized_model, tmp_path):
    """4-bit base: MLX runs quantized + adapter; the fused HF copy uses the dequantized weights."""
    adapter = make_adapter(tiny_quantized_model, tmp_path / "ad", num_layers=1, seed=3)
    ids = prompt_ids(tiny_quantized_model)
    ref = mlx_logits(tiny_quantized_model, ids, adapter)
    hf = fuse(tiny_quantized_model, adapter, tmp_path / "fused")
    assert_close("fused (dequantized) HF vs MLX 4-bit+adapter", ref, torch_logits(hf_model(hf), ids))

    # PEFT on a dequantized copy of the base == MLX 4-bit base + adapter
    base_hf = fuse(tiny_quantized_model, None, tmp_path / "base-hf")
    pm = peft.PeftModel.from_pretrained(hf_model(base_hf), str(to_peft(adapter, tmp_path / "peft"))).eval()
    assert_close("PEFT on dequantized base vs MLX 4-bit+adapter", ref, torch_logits(pm, ids))

    # re-quantized MLX output and the keep-quantized path both load in mlx-lm
    q8 = fuse(tiny_quantized_model, adapter, tmp_path / "q8", quantize={"bits": 8, "group_size": 32})
    assert json.loads((q8 / "config.json").read_text())["quantization"]["bits"] == 8
    assert_close("fused 8-bit MLX vs MLX 4-bit+adapter", ref, mlx_logits(q8, ids), tol=5e-2)
    kept = fuse(tiny_quantized_model, adapter, tmp_path / "kept", dequantize=False)
    assert json.loads((kept / "config.json").read_text())["quantization"]["bits"] == 4
    # re-rounding W + delta to 4 bits is lossy (random tiny weights): it must still carry the adapter
    off = np.abs(mlx_logits(tiny_quantized_model, ids) - ref).max()
    kept_diff = np.abs(mlx_logits(kept, ids) - ref).max()
    print(f"fused kept-4-bit MLX vs MLX 4-bit+adapter: {kept_diff:.3g} (adapter effect {off:.3g})")
    assert kept_diff < 0.5 * off


def test_fuse_upload_sends_the_fused_folder(tiny_model, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id)))

    def fake_upload(folder_path, repo_id, **kw):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload)
    out = fuse(tiny_model, None, tmp_path / "up", upload_repo="me/tiny-fused")
    assert calls[0] == ("create", "me/tiny-fused")
    assert calls[1][0] == "upload" and calls[1][1] == "me/tiny-fused"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in calls[1][2]
    assert (out / "model.safetensors").is_file()


# (c) round trip and PEFT-made adapters ------------------------------------------------


def test_from_peft_round_trip_is_exact(base_and_adapter, tmp_path):
    _, model, adapter = base_and_adapter
    back = from_peft(to_peft(adapter, tmp_path / "peft"), tmp_path / "back")
    a = mx.load(str(adapter / "adapters.safetensors"))
    b = mx.load(str(back / "adapters.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert np.array_equal(np.array(a[k]).view(np.uint32), np.array(b[k]).view(np.uint32)), k
    assert json.loads((back / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text()
    )
    # odd scales survive too (no float alpha has alpha / 3 == 0.1: the metadata keeps it exact)
    odd = make_adapter(model, tmp_path / "odd", num_layers=1, rank=3, scale=0.1, keys=["self_attn.o_proj"])
    back = from_peft(to_peft(odd, tmp_path / "odd-peft"), tmp_path / "odd-back")
    assert json.loads((back / "adapter_config.json").read_text())["lora_parameters"]["scale"] == 0.1
    cfg = json.loads((tmp_path / "odd-peft" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] / cfg["r"] == pytest.approx(0.1, rel=1e-15)


def test_from_peft_of_a_peft_trained_adapter(tiny_model, tmp_path):
    """An adapter made by PEFT itself (rsLoRA, a non-last layer): MLX logits == PEFT logits."""
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, use_rslora=True, lora_dropout=0.05, task_type="CAUSAL_LM",
        target_modules=["q_proj", "o_proj", "up_proj"], layers_to_transform=[0],
    )
    pm = peft.get_peft_model(hf_model(tiny_model), config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path / "peft"))
    ids = prompt_ids(tiny_model)
    ref = torch_logits(pm.eval(), ids)

    out = from_peft(tmp_path / "peft", tmp_path / "mlx", base_model=tiny_model)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 2 and cfg["lora_parameters"]["rank"] == 4
    assert cfg["lora_parameters"]["scale"] == pytest.approx(16 / 2)  # rsLoRA: alpha / sqrt(r)
    # PEFT saves target_modules from a set: their order varies run to run
    assert sorted(cfg["lora_parameters"]["keys"]) == ["mlp.up_proj", "self_attn.o_proj", "self_attn.q_proj"]
    assert_close("MLX(from_peft) vs PEFT", ref, mlx_logits(tiny_model, ids, out))


# (d) quantized HF -> MLX, LoRA and gradients ----------------------------------------


def test_hf_to_mlx_quantized_trains(tiny_model, tmp_path):
    out = hf_to_mlx(tiny_model, tmp_path / "q4", quantize=True, bits=4, group_size=32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    ids = prompt_ids(tiny_model)
    ref = mlx_logits(tiny_model, ids)
    got = mlx_logits(out, ids)
    corr = np.corrcoef(ref.ravel(), got.ravel())[0, 1]
    diff, scale = assert_close("4-bit MLX vs float MLX (random weights)", ref, got, tol=0.25)
    print(f"  correlation {corr:.4f}")
    assert corr > 0.98

    model, _ = load(str(out))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": KEYS})
    x = mx.array([ids])

    def loss_fn(m):
        logits = m(x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")

    loss, grads = nn.value_and_grad(model, loss_fn)(model)
    grads = dict(tree_flatten(grads))
    assert np.isfinite(loss.item())
    assert grads and all(k.endswith(("lora_a", "lora_b")) for k in grads)
    assert len(grads) == 2 * 2 * len(KEYS)
    assert all(bool(mx.all(mx.isfinite(g))) for g in grads.values())
    assert all(float(mx.abs(g).max()) > 0 for k, g in grads.items() if k.endswith("lora_b"))

    with pytest.raises(ValueError, match="bits must be one of"):
        hf_to_mlx(tiny_model, tmp_path / "bad", quantize=True, bits=5)
    with pytest.raises(ValueError, match="not empty"):
        hf_to_mlx(tiny_model, out)


# (e) the rope_theta pitfall -----------------------------------------------------------


def test_hf_to_mlx_fixes_rope_theta(tmp_path):
    src = make_tiny_model(tmp_path / "src", seed=2)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["rope_theta"]  # what transformers 5 writes
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    cfg["dtype"] = "float32"
    (src / "config.json").write_text(json.dumps(cfg))
    ids = prompt_ids(src) * 3
    ref = torch_logits(hf_model(src), ids)  # transformers reads rope_parameters

    naive, _ = load(str(src))
    assert naive.model.layers[0].self_attn.rope.base == 10000.0  # the pitfall itself
    wrong = np.array(naive(mx.array([ids]))[0])
    print(f"without the fix: max |diff| {np.abs(wrong - ref).max():.3g}")

    out = hf_to_mlx(src, tmp_path / "mlx")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_parameters"]["rope_theta"] == 100000.0
    model, _ = load(str(out))
    assert model.model.layers[0].self_attn.rope.base == 100000.0
    assert_close("MLX (fixed rope) vs transformers", ref, mlx_logits(out, ids))
    assert np.abs(wrong - ref).max() > 100 * np.abs(mlx_logits(out, ids) - ref).max()


def test_fix_rope_config_both_ways():
    old = fix_rope_config({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert old["rope_parameters"] == {"type": "linear", "factor": 2.0, "rope_type": "linear", "rope_theta": 5e5}
    new = fix_rope_config({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}})
    assert new["rope_theta"] == 5e5 and new["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    nested = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}
    assert "rope_theta" not in fix_rope_config(nested)


# (f) errors ---------------------------------------------------------------------------


def write_peft(folder, tensors, **config):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapter_model.safetensors"), tensors, metadata={"format": "pt"})
    base = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "target_modules": ["q_proj"], "bias": "none", "fan_in_fan_out": False}
    (folder / "adapter_config.json").write_text(json.dumps({**base, **config}))
    return folder


def lora_pair(name, d_in=64, d_out=64, r=4):
    return {f"base_model.model.{name}.lora_A.weight": mx.ones((r, d_in)),
            f"base_model.model.{name}.lora_B.weight": mx.ones((d_out, r))}


@pytest.mark.parametrize(
    "tensors, config, message",
    [
        (lora_pair("transformer.h.0.attn.c_attn", d_out=192), {"target_modules": ["c_attn"]}, "layers.N"),
        (lora_pair("model.layers.0.self_attn.q_proj", r=8), {}, "rank mismatch"),
        (lora_pair("model.layers.0.self_attn.q_proj"), {"peft_type": "IA3"}, "peft_type"),
        (lora_pair("model.layers.0.self_attn.q_proj"), {"use_dora": True}, "DoRA"),
        (lora_pair("model.layers.0.self_attn.q_proj"), {"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        (lora_pair("model.layers.0.self_attn.q_proj"), {"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
        (lora_pair("model.layers.0.self_attn.qkv_proj", d_out=192), {"target_modules": ["qkv_proj"]}, "does not exist in the base"),
        (lora_pair("model.layers.0.self_attn.q_proj", d_in=96), {}, "shape"),
        (lora_pair("model.layers.7.self_attn.q_proj"), {}, "has layer 7"),
    ],
    ids=["other-arch", "rank", "non-lora", "dora", "rank-pattern", "alpha-pattern", "target", "hidden", "layers"],
)
def test_from_peft_errors(tiny_model, tmp_path, tensors, config, message):
    folder = write_peft(tmp_path / "peft", tensors, **config)
    with pytest.raises(ValueError, match=message) as err:
        from_peft(folder, tmp_path / "out", base_model=tiny_model)
    assert "\n" not in str(err.value)
    print(err.value)
    result = CliRunner().invoke(
        convert_cli, ["from-peft", str(folder), str(tmp_path / "out2"), "--base-model", str(tiny_model)]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1


# CLI ----------------------------------------------------------------------------------


def test_cli_round_trip_and_help(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "ad", num_layers=1, seed=5, model_id="org/tiny")
    runner = CliRunner()
    r = runner.invoke(convert_cli, ["to-peft", str(adapter), str(tmp_path / "peft")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    r = runner.invoke(convert_cli, ["from-peft", str(tmp_path / "peft"), str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(convert_cli, ["fuse", str(tiny_model), str(tmp_path / "fused"), "-a", str(tmp_path / "back")])
    assert r.exit_code == 0, r.output
    ids = prompt_ids(tiny_model)
    assert_close("CLI fuse vs MLX+adapter", mlx_logits(tiny_model, ids, adapter), torch_logits(hf_model(tmp_path / "fused"), ids))
    r = runner.invoke(convert_cli, ["fuse", str(tiny_model), str(tmp_path / "fused")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "not empty" in r.output
    r = runner.invoke(convert_cli, ["to-peft", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert r.exit_code == 1 and "not found" in r.output and "Traceback" not in r.output
    r = runner.invoke(convert_cli, ["gguf-to-mlx", str(tmp_path / "missing.gguf"), str(tmp_path / "g")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and r.output.count("\n") == 1

    for cmd in ["hf-to-mlx", "gguf-to-mlx", "to-peft", "from-peft", "fuse"]:
        r = runner.invoke(convert_cli, [cmd, "--help"])
        assert r.exit_code == 0 and "--upload" in r.output or cmd == "from-peft"
        assert "Default" in r.output or "default" in r.output
    assert "[default: 4]" in runner.invoke(convert_cli, ["hf-to-mlx", "--help"]).output


# (g) the built-in SmolLM2 -------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_peft_matches_mlx(tmp_path):
    builtin = pytest.importorskip("tidpo_mlx.builtin")
    model = builtin.fetch_builtin("smollm2-135m-instruct")
    cfg = json.loads((Path(model) / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    adapter = make_adapter(
        model, tmp_path / "ad", num_layers=4, seed=11, scale=1.0,
        keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"],
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    peft_dir = to_peft(adapter, tmp_path / "peft")
    assert json.loads((peft_dir / "adapter_config.json").read_text())["layers_to_transform"] == list(range(n - 4, n))
    ids = prompt_ids(model, "Name three colours of the rainbow.")
    assert np.abs(mlx_logits(model, ids, adapter) - mlx_logits(model, ids)).max() > 0.5  # the adapter matters

    # As users run it: MLX computes in float16 with 4-bit weights; the HF side is the fused
    # (dequantized, float16) base upcast to float32. The floor is MLX's float16 arithmetic.
    ref = mlx_logits(model, ids, adapter)
    pm = peft.PeftModel.from_pretrained(hf_model(fuse(model, None, tmp_path / "base-hf")), str(peft_dir)).eval()
    got = torch_logits(pm, ids)
    assert_close("SmolLM2 PEFT (fused fp16 base) vs MLX 4-bit+adapter (fp16 compute)", ref, got, tol=5e-3)
    assert got[-1].argmax() == ref[-1].argmax()

    # Exact weights on both sides: MLX 4-bit weights computed in fp32, HF base dequantized in fp32.
    ref32 = mlx_logits(model, ids, adapter, float32=True)
    base32 = fuse(model, None, tmp_path / "base-hf32", dtype="float32")
    pm = peft.PeftModel.from_pretrained(hf_model(base32), str(peft_dir)).eval()
    assert_close("SmolLM2 PEFT (fused fp32 base) vs MLX 4-bit+adapter (fp32 compute)", ref32, torch_logits(pm, ids))
    fused32 = fuse(model, adapter, tmp_path / "fused32", dtype="float32")
    assert_close("SmolLM2 fused fp32 HF vs MLX 4-bit+adapter (fp32 compute)", ref32, torch_logits(hf_model(fused32), ids))


def test_trained_adapter_exports_to_peft_and_matches(tiny_model, tmp_path):
    """Train 3 steps with tidpo-mlx on a 4-bit hf_to_mlx model, export via train --export-peft, compare in PEFT."""
    from conftest import write_jsonl
    from tidpo_mlx.cli import main

    q4 = hf_to_mlx(tiny_model, tmp_path / "q4", quantize=True, bits=4, group_size=32)
    rows = [{"prompt": f"What is {a} plus 2?", "chosen": f"It is {a + 2}.", "rejected": f"It is {a + 3}."}
            for a in range(10)]
    write_jsonl(tmp_path / "d" / "train.jsonl", rows[:8])
    write_jsonl(tmp_path / "d" / "valid.jsonl", rows[8:])
    result = CliRunner().invoke(main, [
        "train", "--quiet", "--model", str(q4), "--data", str(tmp_path / "d"), "--adapter-path",
        str(tmp_path / "ad"), "--iters", "3", "--batch-size", "2", "--num-layers", "2", "--learning-rate", "1e-2",
        "--anchor", "none", "--export-peft", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    ids = prompt_ids(q4)
    ref = mlx_logits(q4, ids, tmp_path / "ad", float32=True)
    base = mlx_logits(q4, ids, float32=True)
    assert np.abs(ref - base).max() > 1e-3  # training moved the adapter
    hf_base = fuse(q4, None, tmp_path / "hf", dtype="float32")  # the same dequantized weights for torch
    pm = peft.PeftModel.from_pretrained(hf_model(hf_base), str(tmp_path / "peft")).eval()
    assert_close("trained adapter: PEFT vs MLX (4-bit base)", ref, torch_logits(pm, ids))
