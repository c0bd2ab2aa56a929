"""The errors lorakit raises; each message names the bad value, what was expected and the fix."""


class LoraError(Exception):
    """Base class of every lorakit error."""


class LoraConfigError(LoraError, ValueError):
    """A LoraConfig field is invalid, or a config matches nothing in the model."""


class AdapterFileError(LoraError, ValueError):
    """An adapter file on disk is missing, malformed, or does not fit the model."""


class AdapterNotFound(LoraError, KeyError):
    """An adapter name is not present on the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class LoraStateError(LoraError, RuntimeError):
    """An operation is not valid in the model's current state (e.g. training while merged)."""
