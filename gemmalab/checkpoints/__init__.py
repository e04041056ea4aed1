"""File formats <-> our config and state dicts; all name mapping lives here."""
from .errors import CheckpointError

__all__ = ["CheckpointError"]
