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
    "InvalidArgumentError",
    "ContextLengthError",
    "InvalidTokenError",
    "NonFiniteError",
    "FileFormatError",
    "CacheError",
    "OutputFolderError",
    "InvalidTypeError",
    "NotFoundError",
    "OutOfMemoryError",
    "SAEConfigError",
    "TrainConfigError",
    "ActivationCacheError",
    "SAEFileError",
    "SweepConfigError",
    "PromptsTooLongError",
    "did_you_mean",
    "check_choice",
    "check_batch_size",
    "check_positive_int",
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


class InvalidArgumentError(MechkitError, ValueError):
    """An argument whose value is outside what the function accepts (a typo of a choice, a
    count that must be positive...)."""


class ContextLengthError(MechkitError, ValueError):
    """Prompts (or a generation) longer than the model's context window ``n_ctx``."""


class InvalidTokenError(MechkitError, ValueError):
    """Token ids outside the model's vocabulary."""


class NonFiniteError(MechkitError, FloatingPointError):
    """Values (logits, scores) that stopped being finite: inf or NaN."""


class FileFormatError(MechkitError, ValueError):
    """A file that exists but is not what it should be: corrupt, truncated or another format."""


class CacheError(MechkitError, OSError):
    """A cache folder that cannot be used, or a cache entry that is damaged or was altered."""


class OutputFolderError(MechkitError, OSError):
    """An output folder that is a file, cannot be written, or holds files this run did not
    write and would overwrite."""


class InvalidTypeError(MechkitError, TypeError):
    """An argument of the wrong type (a metric that is not callable, a string where a list of
    names goes, an object that is not an SAE...), or a required one left as None."""


class NotFoundError(MechkitError, KeyError):
    """A key that a result does not hold (a latent not in a feature report...)."""


class OutOfMemoryError(MechkitError, MemoryError):
    """A run that does not fit in memory even at the smallest batch mechkit can split it to."""


class SAEConfigError(MechkitError, ValueError):
    """A sparse-dictionary config whose fields are missing, of the wrong kind, or inconsistent."""


class TrainConfigError(MechkitError, ValueError):
    """A training config with a value out of range, or one that does not fit the checkpoint."""


class ActivationCacheError(CacheError, ValueError):
    """An activation cache folder whose header does not describe what this store would write
    (a :class:`CacheError`, and a ``ValueError`` as it always was)."""


class SAEFileError(FileFormatError):
    """A folder that is not a readable sparse dictionary in sae-lens's format (a
    :class:`FileFormatError`, so also a ``ValueError``)."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix with the closest choices, or '' when none is close."""
    matches = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def check_choice(
    argument: str, value: object, choices: Iterable[str], *, also: str | None = None
) -> str:
    """Return ``value`` if it is one of ``choices``; else raise :class:`InvalidArgumentError`.

    The message names the argument, lists the choices and suggests close matches, so that a
    typo of ``ablation="maen"`` reads "Did you mean 'mean'?". ``also`` names what else the
    argument accepts besides these strings (e.g. ``"a list of positions"``); the caller checks
    those values itself and calls this only for strings.

    Example:
        >>> check_choice("direction", "noising", ["denoising", "noising"])
        'noising'
    """
    options = list(choices)
    if isinstance(value, str) and value in options:
        return value
    hint = did_you_mean(value, options) if isinstance(value, str) else ""
    other = f" or {also}" if also else ""
    raise InvalidArgumentError(
        f"Expected {argument} to be one of {options}{other}; got {value!r}.{hint}"
    )


def check_positive_int(argument: str, value: object) -> int:
    """Return ``value`` if it is an integer >= 1 (not a bool); else raise
    :class:`InvalidArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"Expected {argument} to be a positive integer; got {value!r}.")
    return value


def check_batch_size(value: object, argument: str = "batch_size") -> int | None:
    """The one check of every ``batch_size`` argument: a positive integer, or ``None`` for
    "choose for me" (usually: all prompts in one batch). ``0`` and negatives are refused rather
    than read as "all" or looped on forever.

    Example:
        >>> check_batch_size(None) is None
        True
        >>> check_batch_size(8)
        8
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(
            f"Expected {argument} to be a positive integer or None (choose for me); got "
            f"{value!r}. Hint: pass None to run all prompts in one batch."
        )
    return value


class SweepConfigError(MechkitError, ValueError):
    """A ``mechkit sweep`` config key or value that is not valid; the message gives the file and
    the key's path in it (``sweep.yaml: sweeps[1].positions: expected ...; got 'evry'``)."""

    def __init__(self, path: str, detail: str, source: str | None = None) -> None:
        self.path, self.detail, self.source = path, detail, source
        where = ": ".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {detail}" if where else detail)

    def within(self, prefix: str) -> SweepConfigError:
        """The same error, its path below ``prefix`` (``sweeps[1]`` + ``positions``)."""
        sep = "" if not self.path or self.path.startswith("[") else "."
        return type(self)(prefix + sep + self.path, self.detail, self.source)


class PromptsTooLongError(SweepConfigError, ContextLengthError):
    """A sweep's prompt pairs are longer than the model's context ``n_ctx``; the message names
    the config key."""
