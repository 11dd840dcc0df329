"""Upload a converted folder to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from tidpo_mlx.errors import MissingFileError


def upload(folder, repo_id: str) -> str:
    """Create ``repo_id`` (a model repo, if missing) and upload every file of ``folder``.

    Needs network access and a token (``huggingface-cli login`` or ``HF_TOKEN``).
    Returns the URL of the commit.
    """
    import huggingface_hub

    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{folder} is not a folder")
    huggingface_hub.create_repo(repo_id, repo_type="model", exist_ok=True)
    info = huggingface_hub.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message="Upload with tidpo-mlx convert",
    )
    return str(info)
