"""``tidpo-mlx convert``: Hugging Face / GGUF in, MLX folders, PEFT adapters and fused models out."""

from __future__ import annotations

import functools

import click

from tidpo_mlx.errors import TidpoError, first_line


def _one_line_errors(fn):
    """Turn the converters' errors (TidpoError and the ValueError / FileNotFoundError / FileExistsError
    of the checks in hf.py and fuse.py) into a one-line CLI error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (TidpoError, ValueError, FileNotFoundError, FileExistsError) as e:
            raise click.ClickException(first_line(e)) from None

    return wrapper


def _upload_option(fn):
    return click.option(
        "--upload",
        "upload_repo",
        metavar="REPO",
        default=None,
        help="After converting, upload the output folder to this Hugging Face repo "
        "(created if missing; needs a token). Default: no upload.",
    )(fn)


def _maybe_upload(folder, repo):
    if repo:
        from tidpo_mlx.convert.hub import upload

        upload(folder, repo)
        click.echo(f"uploaded {folder} to {repo}")


@click.group("convert")
def convert():
    """Convert models and adapters: Hugging Face / GGUF -> MLX, MLX adapters <-> PEFT, fused export."""


@convert.command("hf-to-mlx")
@click.argument("hf_path_or_id")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("-q", "--quantize", is_flag=True, default=False, help="Quantize the weights (affine). Default: off.")
@click.option(
    "--bits", type=click.Choice(["2", "3", "4", "6", "8"]), default="4", show_default=True,
    help="Bits per weight when --quantize is given.",
)
@click.option(
    "--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
    help="Quantization group size when --quantize is given.",
)
@click.option(
    "--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
    help="Cast the float weights to this type. Default: keep the checkpoint's dtype.",
)
@_upload_option
@_one_line_errors
def hf_to_mlx_cmd(hf_path_or_id, out_dir, quantize, bits, group_size, dtype, upload_repo):
    """Convert a Hugging Face model HF_PATH_OR_ID (local folder or hub id) into the MLX folder OUT_DIR.

    The written config.json has rope_theta both at top level and in rope_parameters,
    so a checkpoint saved by transformers 5 keeps its RoPE base in mlx-lm.
    """
    from tidpo_mlx.convert.hf import hf_to_mlx

    out = hf_to_mlx(hf_path_or_id, out_dir, quantize=quantize, bits=int(bits), group_size=int(group_size), dtype=dtype)
    click.echo(f"wrote {out}")
    _maybe_upload(out, upload_repo)


@convert.command("gguf-to-mlx")
@click.argument("gguf_path", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@_upload_option
@_one_line_errors
def gguf_to_mlx_cmd(gguf_path, out_dir, upload_repo):
    """Convert the GGUF file GGUF_PATH into the MLX folder OUT_DIR.

    Quantized tensors stay quantized, q/k rows are put back in the Hugging Face layout
    and the tokenizer is taken from the GGUF metadata.
    """
    from tidpo_mlx.convert.gguf import gguf_to_mlx

    out = gguf_to_mlx(gguf_path, out_dir)
    click.echo(f"wrote {out}")
    _maybe_upload(out, upload_repo)


@convert.command("to-peft")
@click.argument("adapter_path", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--base-model", default=None, metavar="ID_OR_PATH",
    help="base_model_name_or_path to write in the PEFT config. "
    "Default: the adapter config's base_model_name_or_path, else its model.",
)
@_upload_option
@_one_line_errors
def to_peft_cmd(adapter_path, out_dir, base_model, upload_repo):
    """Write the mlx-lm LoRA adapter ADAPTER_PATH as a Hugging Face PEFT adapter in OUT_DIR.

    Load it with peft.PeftModel.from_pretrained(base_model, OUT_DIR).
    """
    from tidpo_mlx.convert.peft import to_peft

    out = to_peft(adapter_path, out_dir, base_model=base_model)
    click.echo(f"wrote {out}")
    _maybe_upload(out, upload_repo)


@convert.command("from-peft")
@click.argument("peft_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--base-model", default=None, metavar="PATH",
    help="Local MLX or Hugging Face model folder to check every tensor against and to take "
    "the layer count from. Default: the PEFT config's base_model_name_or_path when it is a "
    "local folder or a cached hub id (layer count only).",
)
@_one_line_errors
def from_peft_cmd(peft_dir, out_dir, base_model):
    """Write the PEFT LoRA adapter PEFT_DIR as an mlx-lm adapter folder OUT_DIR.

    The result loads with mlx_lm.generate --adapter-path OUT_DIR, and training
    continues from it with the train option resume_adapter_file set to OUT_DIR.
    """
    from tidpo_mlx.convert.peft import from_peft

    out = from_peft(peft_dir, out_dir, base_model=base_model)
    click.echo(f"wrote {out}")


@convert.command("fuse")
@click.argument("model_path")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "-a", "--adapter-path", type=click.Path(file_okay=False), default=None,
    help="mlx-lm LoRA adapter folder to merge. Default: none (export the base model alone).",
)
@click.option(
    "--dequantize/--no-dequantize", default=True, show_default=True,
    help="Write full-precision weights as a Hugging Face folder (transformers loads it). "
    "--no-dequantize keeps a quantized base quantized (an MLX folder).",
)
@click.option(
    "--quantize-bits", type=click.Choice(["2", "3", "4", "6", "8"]), default=None,
    help="Re-quantize the fused weights to this many bits and write an MLX folder. Default: no re-quantization.",
)
@click.option(
    "--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
    help="Group size for --quantize-bits.",
)
@click.option(
    "--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
    help="Cast the float parameters (quantization scales included) before fusing. Default: keep the model's.",
)
@_upload_option
@_one_line_errors
def fuse_cmd(model_path, out_dir, adapter_path, dequantize, quantize_bits, group_size, dtype, upload_repo):
    """Merge LoRA adapters into MODEL_PATH (MLX folder or hub id) and write OUT_DIR.

    Default output: a dequantized Hugging Face folder (safetensors, config.json with
    rope_theta and rope_parameters, tokenizer files).
    """
    from tidpo_mlx.convert.fuse import fuse

    quantize = {"bits": int(quantize_bits), "group_size": int(group_size)} if quantize_bits else None
    out = fuse(model_path, adapter_path, out_dir, dequantize=dequantize, quantize=quantize,
               upload_repo=upload_repo, dtype=dtype)
    click.echo(f"wrote {out}" + (f" and uploaded it to {upload_repo}" if upload_repo else ""))


@convert.command("to-gguf")
@click.argument("model_path")
@click.argument("out_file", type=click.Path(dir_okay=False))
@click.option(
    "-a", "--adapter-path", type=click.Path(file_okay=False), default=None,
    help="mlx-lm LoRA adapter folder to merge (or, with --lora-only, to export). Default: none (the base alone).",
)
@click.option(
    "--outtype", type=click.Choice(["f16", "q8_0", "q4_0"]), default="f16", show_default=True,
    help="Weight type of the 2-D tensors (q4_0 keeps the output matrix in q8_0).",
)
@click.option(
    "--lora-only", is_flag=True, default=False,
    help="Write the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER) instead of a merged model.",
)
@click.option(
    "--ollama", is_flag=True, default=False,
    help="Also write an Ollama Modelfile beside OUT_FILE (FROM, TEMPLATE, stop tokens; ADAPTER with --lora-only).",
)
@click.option("--overwrite", is_flag=True, default=False, help="Replace OUT_FILE (and the Modelfile) if they exist.")
@_one_line_errors
def to_gguf_cmd(model_path, out_file, adapter_path, outtype, lora_only, ollama, overwrite):
    """Write MODEL_PATH (built-in name, .gguf, MLX or Hugging Face folder, hub id) with its adapter merged
    as the GGUF file OUT_FILE for llama.cpp, Ollama and LM Studio.

    With --lora-only, OUT_FILE is the adapter alone; apply it to a GGUF of the
    same base with `llama-cli -m base.gguf --lora OUT_FILE`. Nothing is left
    behind on failure: the file is written under a temporary name and renamed.
    """
    from tidpo_mlx.convert.gguf_export import check_output, lora_to_gguf, to_gguf
    from tidpo_mlx.convert.ollama import gguf_base, modelfile_path, write_modelfile

    if lora_only and adapter_path is None:
        raise click.UsageError("--lora-only needs --adapter-path")
    check_output(out_file, overwrite)
    if ollama:
        modelfile_path(out_file, overwrite)
        if lora_only:
            gguf_base(model_path)
    if lora_only:
        lora_to_gguf(model_path, adapter_path, out_file, overwrite=overwrite)
    else:
        to_gguf(model_path, out_file, adapter_path=adapter_path, outtype=outtype, overwrite=overwrite)
    click.echo(f"wrote {out_file}")
    if ollama:
        from tidpo_mlx.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(model_path))._tokenizer
        path, notes = write_modelfile(out_file, model_path, tokenizer, lora_only=lora_only, overwrite=overwrite)
        click.echo(f"wrote {path}" + "".join(f"\nnote: {n}" for n in notes))


main = convert
