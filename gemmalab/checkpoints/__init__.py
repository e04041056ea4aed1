"""File formats <-> our config and state dicts; all name mapping lives here."""
from pathlib import Path

from .errors import CheckpointError

__all__ = ["CheckpointError", "checkpoint_kind"]


def checkpoint_kind(path: Path) -> str:
    """'gguf' or 'hf' for a path a user gave, or a CheckpointError that says what is wrong."""
    from .gguf import is_gguf

    if not path.exists():
        raise CheckpointError(f"no such file or directory: {path}")
    if path.is_dir():
        return "hf"
    if path.suffix.lower() == ".gguf" or is_gguf(path):
        return "gguf"  # open_gguf explains what is wrong with a damaged .gguf file
    raise CheckpointError(f"{path} is neither a GGUF file nor a Hugging Face model directory "
                          "(config.json + *.safetensors)")
