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
    "MissingDependencyError",
    "WorkerError",
    "did_you_mean",
    "check_choice",
    "check_batch_size",
    "check_positive_int",
]


class MechkitError(Exception):
    """Base class of every error raised by mechkit.

    Example:
        >>> try:
        ...     mk.load_model("no-such-model")
        ... except mk.MechkitError as err:  # catches every mechkit error
        ...     print(type(err).__name__, isinstance(err, KeyError))
        UnknownModelError True
    """

    def __str__(self) -> str:  # KeyError would otherwise print the message in quotes
        return str(self.args[0]) if self.args else ""


class UnknownModelError(MechkitError, KeyError):
    """A model name that is neither built in, a TransformerLens name, nor a local path.

    Example:
        >>> mk.load_model("attn-only-2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.UnknownModelError: ...; got 'attn-only-2'. Did you mean 'attn-only-2l'...?
    """


class ModelUnavailableError(MechkitError, OSError):
    """A known model whose weights cannot be reached (offline, no local copy).

    Example:
        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):  # as on a machine offline
        ...     mk.load_model("meta-llama/Llama-2-7b-hf")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.ModelUnavailableError: Expected the weights of 'meta-llama/Llama-2-7b-hf' ...
        >>> issubclass(mk.ModelUnavailableError, OSError)
        True
    """


class UnsupportedModelError(MechkitError, ValueError):
    """A model file or folder that was found but cannot be converted to a HookedTransformer.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as folder:  # a config.json that describes no model
        ...     _ = (Path(folder) / "config.json").write_text("{}")
        ...     mk.load_model(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.UnsupportedModelError: Expected a causal language model ...
    """


class DeviceError(MechkitError, ValueError):
    """A device that does not exist on this machine, or a dtype that is not a float type.

    Example:
        >>> mk.load_model("attn-only-2l", device="tpu:0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.DeviceError: Expected a device such as 'cpu', ...; got 'tpu:0', ...
    """


class SiteNotFoundError(MechkitError, KeyError):
    """A site or hook name that the model does not have.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> with mk.capture(model, "blocks.0.hook_resid_pr"):  # doctest: +ELLIPSIS
        ...     pass
        Traceback (most recent call last):
        ...
        mechkit.errors.SiteNotFoundError: ...; got 'blocks.0.hook_resid_pr'. Did you mean ...
        >>> with mk.capture(model, mk.Site("resid_pre", layer=0)) as acts:
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> try:
        ...     acts[mk.Site("resid_post", layer=1)]  # not captured
        ... except KeyError as err:  # a SiteNotFoundError is also a KeyError
        ...     print(type(err).__name__)
        SiteNotFoundError
    """


class InvalidSiteError(MechkitError, ValueError):
    """A site whose fields do not fit together or do not fit the model (layer out of range...).

    Example:
        >>> model = mk.load_model("attn-only-2l")  # layers 0 and 1
        >>> with mk.capture(model, mk.Site("resid_pre", layer=5)):  # doctest: +ELLIPSIS
        ...     pass
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidSiteError: ...
    """


class PromptLengthError(MechkitError, ValueError):
    """Prompts whose token lengths differ where they must match.

    Example:
        >>> mk.PromptPairs.from_tokens([[1, 2, 3]], [[1, 2]], [4], [5])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.PromptLengthError: Expected each clean prompt to have as many tokens as ...
    """


class MultiTokenAnswerError(MechkitError, ValueError):
    """An answer string that tokenizes to more than one token.

    Example:
        >>> mk.tokenize_answer(mk.load_model("smollm2-135m"), " Hello there")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.MultiTokenAnswerError: Expected an answer that is a single token; ...
    """


class EmptyDatasetError(MechkitError, ValueError):
    """A dataset with no examples.

    Example:
        >>> mk.tokens.token_batch(mk.load_model("attn-only-2l"), [])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.EmptyDatasetError: Expected at least one prompt ...
    """


class DatasetFormatError(MechkitError, ValueError):
    """A dataset file line that is not valid JSON or lacks a field.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> model = mk.load_model("attn-only-2l")
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "pairs.jsonl"
        ...     _ = path.write_text('{"clean": "A B", "corrupt": "A C"}\\n')  # no answer, no wrong
        ...     mk.PromptPairs.from_jsonl(model, path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.DatasetFormatError: ...pairs.jsonl:1: ...
    """


class ShapeError(MechkitError, ValueError):
    """A tensor whose shape does not match what a function expects.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> mk.tokens.token_batch(model, torch.zeros(1, 2, 3, dtype=torch.long))
        Traceback (most recent call last):
        ...
        mechkit.errors.ShapeError: Expected tokens of shape (batch, pos); got (1, 2, 3).
    """


class UnknownKindError(MechkitError, ValueError):
    """A kind (of head, score...) that is not among the ones a function knows.

    Example:
        >>> mk.detect_heads(mk.load_model("attn-only-2l"), "inductoin")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.UnknownKindError: ...
    """


class InvalidArgumentError(MechkitError, ValueError):
    """An argument whose value is outside what the function accepts (a typo of a choice, a
    count that must be positive...).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> def metric(logits):
        ...     return logits[:, -1, 0].mean()
        >>> mk.activation_patch(model, [[1, 2, 3]], [[1, 2, 4]], metric, ablation="maen")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidArgumentError: Expected ablation to be one of ...Did you mean 'mean'?
    """


class ContextLengthError(MechkitError, ValueError):
    """Prompts (or a generation) longer than the model's context window ``n_ctx``.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> too_long = torch.zeros(1, 500, dtype=torch.long)  # (batch, pos), n_ctx is shorter
        >>> mk.tokens.token_batch(model, too_long)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.ContextLengthError: Expected prompts of at most n_ctx=... tokens ...
    """


class InvalidTokenError(MechkitError, ValueError):
    """Token ids outside the model's vocabulary.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> mk.tokens.token_batch(model, [[1, 10_000]])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidTokenError: Expected token ids in [0, 500) ...; got 10000 ...
    """


class NonFiniteError(MechkitError, FloatingPointError):
    """Values (logits, scores) that stopped being finite: inf or NaN.

    Example:
        >>> import copy
        >>> broken = copy.deepcopy(mk.load_model("attn-only-2l"))
        >>> _ = broken.unembed.W_U.data.fill_(float("inf"))  # weights that overflowed
        >>> mk.lens.compare_lenses(broken, torch.tensor([[1, 2, 3]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.NonFiniteError: Expected finite KL divergences; got inf or NaN. ...
    """


class FileFormatError(MechkitError, ValueError):
    """A file that exists but is not what it should be: corrupt, truncated or another format.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "circuit.json"
        ...     _ = path.write_text("not json")
        ...     mk.CircuitGraph.load(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.FileFormatError: ...
    """


class CacheError(MechkitError, OSError):
    """A cache folder that cannot be used, or a cache entry that is damaged or was altered.

    Example:
        >>> import os, tempfile
        >>> from unittest import mock
        >>> with tempfile.NamedTemporaryFile() as file, mock.patch.dict(
        ...     os.environ, {"MECHKIT_CACHE_DIR": file.name}  # a file, not a folder
        ... ):
        ...     mk.load_model("smollm2-135m")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.CacheError: ...
    """


class OutputFolderError(MechkitError, OSError):
    """An output folder that is a file, cannot be written, or holds files this run did not
    write and would overwrite.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from mechkit.patching.sweep import run_sweep
        >>> from mechkit.patching.sweep_config import config_from_dict
        >>> config = config_from_dict({"model": "attn-only-2l", "sweeps": [{"site": "resid_pre"}],
        ...                            "prompts": {"generator": "repeated_tokens", "n": 2}})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     out = Path(folder) / "results"
        ...     _ = out.write_text("")  # a file where the output folder should go
        ...     run_sweep(config, out=out, progress=False)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.OutputFolderError: ...
    """


class InvalidTypeError(MechkitError, TypeError):
    """An argument of the wrong type (a metric that is not callable, a string where a list of
    names goes, an object that is not an SAE...), or a required one left as None.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> mk.activation_patch(model, [[1, 2, 3]], [[1, 2, 4]], "logit_diff")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidTypeError: Expected a metric: a mechkit Metric or a function ...
    """


class NotFoundError(MechkitError, KeyError):
    """A key that a result does not hold (a latent not in a feature report...).

    Example:
        >>> from mechkit.sae import SAEConfig, SparseDictionary
        >>> model = mk.load_model("attn-only-2l")
        >>> sae = SparseDictionary.from_config(SAEConfig(
        ...     architecture="relu", d_in=128, d_sae=64, hook_name="blocks.0.hook_resid_post"))
        >>> report = mk.sae.collect_features(model, sae, torch.randint(1, 500, (2, 8)), [1, 2],
        ...                                  progress=False)
        >>> report[7]
        Traceback (most recent call last):
        ...
        mechkit.errors.NotFoundError: Expected one of the latents in this report [1, 2]; got 7.
    """


class OutOfMemoryError(MechkitError, MemoryError):
    """A run that does not fit in memory even at the smallest batch mechkit can split it to.

    Example:
        >>> def work(rows):  # a pass that does not fit even for one prompt
        ...     raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        >>> mk.core.each_batch(4, None, work)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.OutOfMemoryError: Out of memory on 1 prompt(s) in one pass. ...
        >>> issubclass(mk.OutOfMemoryError, MemoryError)
        True
    """


class SAEConfigError(MechkitError, ValueError):
    """A sparse-dictionary config whose fields are missing, of the wrong kind, or inconsistent.

    Example:
        >>> mk.sae.SAEConfig(
        ...     architecture="relu", d_in=0, d_sae=8, hook_name="blocks.0.hook_resid_post"
        ... )  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.SAEConfigError: Expected d_in to be a positive int; got 0...
    """


class TrainConfigError(MechkitError, ValueError):
    """A training config with a value out of range, or one that does not fit the checkpoint.

    Example:
        >>> mk.sae.TrainConfig(lr=-1.0)
        Traceback (most recent call last):
        ...
        mechkit.errors.TrainConfigError: Expected lr > 0 (or None for the default); got -1.0.
    """


class ActivationCacheError(CacheError, ValueError):
    """An activation cache folder whose header does not describe what this store would write
    (a :class:`CacheError`, and a ``ValueError`` as it always was).

    Example:
        >>> import tempfile
        >>> model = mk.load_model("attn-only-2l")
        >>> tokens = torch.randint(1, 500, (2, 8))
        >>> with tempfile.TemporaryDirectory() as folder:  # one folder for two different stores
        ...     for hook_name in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        ...         store = mk.sae.ActivationStore(model, hook_name, tokens, cache_dir=folder)
        ...         _ = store.build_cache()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.ActivationCacheError: Expected the cache in ... to match this store; ...
    """


class SAEFileError(FileFormatError):
    """A folder that is not a readable sparse dictionary in sae-lens's format (a
    :class:`FileFormatError`, so also a ``ValueError``).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:  # an empty folder
        ...     mk.load_sae(folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.SAEFileError: ...
        >>> issubclass(mk.sae.SAEFileError, ValueError)
        True
    """


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """A ' Did you mean ...?' suffix with the closest choices, or '' when none is close.

    Example:
        >>> did_you_mean("maen", ["mean", "zero", "corrupt"])
        " Did you mean 'mean'?"
        >>> did_you_mean("xyz", ["mean", "zero"])
        ''
    """
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
    :class:`InvalidArgumentError`.

    Example:
        >>> check_positive_int("n_prompts", 4)
        4
        >>> check_positive_int("n_prompts", 0)
        Traceback (most recent call last):
        ...
        mechkit.errors.InvalidArgumentError: Expected n_prompts to be a positive integer; got 0.
    """
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
    the key's path in it (``sweep.yaml: sweeps[1].positions: expected ...; got 'evry'``).

    Example:
        >>> from mechkit.patching.sweep_config import config_from_dict
        >>> config_from_dict({"model": "attn-only-2l", "prompts": {"generator": "ioi"},
        ...                   "sweeps": [{"site": "resid_pre", "positions": "evry"}]})
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.SweepConfigError: sweeps[0].positions: ...
    """

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
    the config key.

    Example:
        >>> from mechkit.patching.sweep_config import build_pairs, config_from_dict
        >>> config = config_from_dict({"model": "attn-only-2l", "sweeps": [{"site": "resid_pre"}],
        ...                            "prompts": {"generator": "repeated_tokens", "length": 100}})
        >>> build_pairs(mk.load_model("attn-only-2l"), config)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechkit.errors.PromptsTooLongError: prompts.generator: expected prompts of at most ...
    """


class MissingDependencyError(MechkitError, ImportError):
    """An optional dependency a feature needs is not installed; the message gives the install
    command (``pip install 'mechkit[ray]'``).

    Example:
        >>> raise MissingDependencyError("Expected Ray. Hint: pip install 'mechkit[ray]'")
        Traceback (most recent call last):
        ...
        mechkit.errors.MissingDependencyError: Expected Ray. Hint: pip install 'mechkit[ray]'
    """


class WorkerError(MechkitError, RuntimeError):
    """Distributed work could not finish: its workers (Ray actors) died more often than allowed,
    or none could load the model; the message gives the limit and the last worker error.

    Example:
        >>> raise WorkerError("Expected a task to finish; its actor died 4 times.")
        Traceback (most recent call last):
        ...
        mechkit.errors.WorkerError: Expected a task to finish; its actor died 4 times.
    """
