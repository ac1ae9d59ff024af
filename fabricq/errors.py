"""The one exception type users see: a clear, specific message about their input."""


class FabricqError(Exception):
    """Bad input or an unusable environment, reported as one line before expensive work."""
