"""Errors raised for files a user hands us; the CLI prints them as one line."""


class CheckpointError(ValueError):
    """A model file or directory that cannot be read: wrong path, corrupt, unsupported."""
