"""One error family for everything a user can cause.

The CLI turns any HatcError into one line on stderr and exit code 2; anything
else is a bug (exit 1). Library code raises these with a message that names the
file, field or value and says what to do.
"""


class HatcError(Exception):
    """Base class: bad input or a state the user can fix."""

    exit_code = 2


class Interrupted(HatcError):
    """Ctrl-C or SIGTERM stopped a long job after it saved its state."""

    exit_code = 130


class SpaceError(HatcError):
    """A design space file is malformed or unknown."""


class ArchError(HatcError):
    """An architecture is malformed or outside its design space."""


class DataError(HatcError):
    """A corpus, data directory or subword model is unusable."""


class CheckpointError(HatcError):
    """A checkpoint is missing, corrupt, or does not fit what was asked."""


class ArtifactError(HatcError):
    """An artifact is missing, malformed, tampered with, or cannot run here."""
