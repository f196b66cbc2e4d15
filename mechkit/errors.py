"""The exceptions mechkit raises.

Every error is a :class:`MechkitError`; each subclass also inherits the builtin a Python user
would catch (``KeyError`` for a missing name, ``ValueError`` for a bad value), so
``except KeyError`` keeps working. Messages follow one shape: what was expected, what came,
and a hint on what to do.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "MechkitError",
    "UnknownModelError",
    "ModelUnavailableError",
    "UnsupportedModelError",
    "DeviceError",
    "SiteNotFoundError",
    "InvalidSiteError",
    "PromptLengthError",
    "MultiTokenAnswerError",
    "EmptyDatasetError",
    "DatasetFormatError",
    "ShapeError",
    "UnknownKindError",
    "did_you_mean",
]


class MechkitError(Exception):
    """Base class of every error raised by mechkit."""

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class UnknownModelError(MechkitError, KeyError):
    """A model name that is neither built in, a TransformerLens name, nor a local path."""


class ModelUnavailableError(MechkitError, OSError):
    """A known model whose weights cannot be reached (offline, no local copy)."""


class UnsupportedModelError(MechkitError, ValueError):
    """A model file or folder that was found but cannot be converted to a HookedTransformer."""


class DeviceError(MechkitError, ValueError):
    """A device that does not exist on this machine, or a dtype that is not a float type."""


class SiteNotFoundError(MechkitError, KeyError):
    """A site or hook name that the model does not have."""


class InvalidSiteError(MechkitError, ValueError):
    """A site whose fields do not fit together or do not fit the model (layer out of range...)."""


class PromptLengthError(MechkitError, ValueError):
    """Prompts whose token lengths differ where they must match."""


class MultiTokenAnswerError(MechkitError, ValueError):
    """An answer string that tokenizes to more than one token."""


class EmptyDatasetError(MechkitError, ValueError):
    """A dataset with no examples."""


class DatasetFormatError(MechkitError, ValueError):
    """A dataset file line that is not valid JSON or lacks a field."""


class ShapeError(MechkitError, ValueError):
    """A tensor whose shape does not match what a function expects."""


class UnknownKindError(MechkitError, ValueError):
    """A kind (of head, score...) that is not among the ones a function knows."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix with the closest choices, or '' when none is close."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"
