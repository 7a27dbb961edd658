"""Errors a user can act on: each names the file or input at fault and the fix."""


class LiveAvatarError(ValueError):
    """Base class for every error this package raises on purpose."""


class CheckpointError(LiveAvatarError):
    """A model file is missing, damaged, or holds another network than the one asked for."""


class InputError(LiveAvatarError):
    """A generation input (audio, image, size, counts) cannot be used."""


class DistributedError(LiveAvatarError):
    """The multi-process pipeline could not start, or one of its processes failed."""
