"""What a sparse dictionary is: :class:`SAEConfig`, and the registry of architectures.

Kept apart from the module classes (:mod:`mechkit.sae.base`) so that reading and writing files
(:mod:`mechkit.sae.io`) needs only the config and the registry: ``base`` uses ``io`` to save,
and ``io`` no longer imports ``base``.
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
from typing import TYPE_CHECKING, Any, Literal

import torch

from mechkit.errors import SAEConfigError, UnknownKindError, did_you_mean

if TYPE_CHECKING:
    from mechkit.sae.base import SparseDictionary

__all__ = ["ARCHITECTURES", "DTYPES", "SAEConfig", "architecture_class", "register_architecture"]

#: key -> class; filled by the architecture modules when :mod:`mechkit.sae` is imported.
ARCHITECTURES: dict[str, type[SparseDictionary]] = {}

_ARCHITECTURE_MODULES = ("relu", "topk", "batchtopk", "jumprelu")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_K_ARCHITECTURES = ("topk", "batchtopk")


def _registry() -> dict[str, type[SparseDictionary]]:
    """The registry, after importing every architecture module (they register on import)."""
    for name in _ARCHITECTURE_MODULES:
        importlib.import_module(f"mechkit.sae.{name}")
    return ARCHITECTURES


def architecture_class(key: str) -> type[SparseDictionary]:
    """The class registered under ``key`` (every architecture module imported first).

    Example:
        >>> architecture_class("topk").__name__
        'TopKSAE'
    """
    known = _registry()
    if key not in known:
        raise UnknownKindError(
            f"Expected architecture to be one of {sorted(known)}; got {key!r}."
            f"{did_you_mean(str(key), known) or ' Hint: see ARCHITECTURES.'}"
        )
    return known[key]


def register_architecture(key: str) -> Any:
    """Class decorator: register a :class:`SparseDictionary` subclass under ``key``.

    Raises:
        SAEConfigError: ``key`` is already taken by another class.

    Example:
        >>> sorted(architecture_class(k).__name__ for k in ("relu", "topk"))
        ['ReLUSAE', 'TopKSAE']
        >>> register_architecture("topk")(type("Other", (), {}))   # a duplicate key is an error
        Traceback (most recent call last):
        ...
        mechkit.errors.SAEConfigError: Expected a new architecture key; got 'topk', ...
    """

    def decorator(cls: type[SparseDictionary]) -> type[SparseDictionary]:
        if key in ARCHITECTURES and ARCHITECTURES[key] is not cls:
            raise SAEConfigError(
                f"Expected a new architecture key; got {key!r}, already registered to "
                f"{ARCHITECTURES[key].__qualname__}. Hint: choose another key."
            )
        cls.architecture = key
        ARCHITECTURES[key] = cls
        return cls

    return decorator


def _positive_int(name: str, value: Any, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise SAEConfigError(f"Expected {name} to be a positive int; got {value!r}.{hint}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """What a sparse dictionary is, independent of how it was trained.

    Attributes:
        architecture: registry key, one of ``"relu"``, ``"topk"``, ``"batchtopk"``,
            ``"jumprelu"``.
        d_in: width of the input activation.
        d_sae: number of latents.
        hook_name: TransformerLens hook whose activation is the input.
        d_out: transcoders: output width; None for an SAE (output = input, ``d_in`` wide).
        out_hook_name: transcoders: the hook whose activation it predicts (None: unknown,
            e.g. a foreign file that did not record it).
        k: latents kept per token (``topk``) or per token on average (``batchtopk``).
        skip: skip transcoder: the output adds ``x @ W_skip`` (needs ``d_out``).
        model_name: the model the input comes from, when known.
        dtype: parameter dtype.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding. None means the
            usual choice: True for an SAE, False for a transcoder (whose ``b_dec`` lives in the
            output space); it is resolved to a bool at construction.
        rescale_acts_by_decoder_norm: ``topk`` only, sae-lens's option: rank pre-activations
            times decoder-row norms and divide latents by them before decoding.
        normalize_activations: sae-lens's field. Only ``"none"`` and
            ``"expected_average_only_in"`` (a training-time scale, already folded into the
            weights of a saved file, so a no-op at inference, as in sae-lens) are supported.

    Example:
        >>> cfg = SAEConfig(architecture="topk", d_in=128, d_sae=1024, k=32,
        ...                 hook_name="blocks.1.hook_resid_post")
        >>> cfg.out_width, cfg.is_transcoder, SAEConfig.from_dict(cfg.to_dict()) == cfg
        (128, False, True)
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    d_out: int | None = None
    out_hook_name: str | None = None
    k: int | None = None
    skip: bool = False
    model_name: str | None = None
    dtype: str = "float32"
    apply_b_dec_to_input: bool | None = None
    rescale_acts_by_decoder_norm: bool = False
    normalize_activations: Literal["none", "expected_average_only_in"] = "none"

    def __post_init__(self) -> None:
        known = _registry()
        if self.architecture not in known:
            raise UnknownKindError(
                f"Expected architecture to be one of {sorted(known)}; got {self.architecture!r}."
                f"{did_you_mean(str(self.architecture), known) or ' Hint: see ARCHITECTURES.'}"
            )
        _positive_int("d_in", self.d_in)
        _positive_int("d_sae", self.d_sae)
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise SAEConfigError(
                f"Expected hook_name to be a TransformerLens hook name such as "
                f"'blocks.6.hook_resid_post'; got {self.hook_name!r}."
            )
        if self.d_out is not None:
            _positive_int("d_out", self.d_out)
        elif self.out_hook_name is not None:
            raise SAEConfigError(
                f"Expected d_out (the output width) with out_hook_name={self.out_hook_name!r}; "
                "got d_out=None. Hint: a transcoder needs both; an SAE neither."
            )
        if self.skip and self.d_out is None:
            raise SAEConfigError(
                "Expected d_out for skip=True (a skip transcoder); got d_out=None. Hint: skip "
                "connections are for transcoders; set d_out and out_hook_name."
            )
        if self.architecture in _K_ARCHITECTURES:
            _positive_int(
                "k",
                self.k,
                f" Hint: architecture {self.architecture!r} needs k, the latents kept per token.",
            )
            if self.k is not None and self.k > self.d_sae:
                raise SAEConfigError(
                    f"Expected k <= d_sae ({self.d_sae}); got k={self.k}."
                    " Hint: k is the number of latents kept per token."
                )
        elif self.k is not None:
            raise SAEConfigError(
                f"Expected k=None for architecture {self.architecture!r}; got k={self.k!r}. "
                f"Hint: only {list(_K_ARCHITECTURES)} use k."
            )
        if self.rescale_acts_by_decoder_norm and self.architecture != "topk":
            raise SAEConfigError(
                f"Expected rescale_acts_by_decoder_norm=False for {self.architecture!r}; got "
                "True. Hint: only 'topk' supports it."
            )
        if self.dtype not in DTYPES:
            raise SAEConfigError(
                f"Expected dtype to be one of {sorted(DTYPES)}; got {self.dtype!r}."
                f"{did_you_mean(str(self.dtype), DTYPES)}"
            )
        if self.apply_b_dec_to_input is None:
            object.__setattr__(self, "apply_b_dec_to_input", self.d_out is None)
        elif self.apply_b_dec_to_input and self.d_out is not None:
            raise SAEConfigError(
                "Expected apply_b_dec_to_input=False for a transcoder (b_dec is in the output "
                "space); got True. Hint: leave it None to get the usual choice."
            )
        if not isinstance(self.skip, bool):
            raise SAEConfigError(f"Expected skip to be a bool; got {self.skip!r}.")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise SAEConfigError(
                "Expected normalize_activations 'none' or 'expected_average_only_in'; got "
                f"{self.normalize_activations!r}. Hint: fold the normalisation into the weights."
                + did_you_mean(
                    str(self.normalize_activations), ["none", "expected_average_only_in"]
                )
            )

    @property
    def is_transcoder(self) -> bool:
        """True when the output is another hook's activation (``d_out`` is set)."""
        return self.d_out is not None

    @property
    def out_width(self) -> int:
        """The output width: ``d_out`` for a transcoder, else ``d_in``."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``from_dict`` inverts it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """A config from :meth:`to_dict`'s dict.

        Raises:
            SAEConfigError: unknown keys (with close matches) or missing required ones.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [key for key in d if key not in names]
        if unknown:
            raise SAEConfigError(
                f"Expected only SAEConfig fields {sorted(names)}; got unknown {unknown}."
                f"{did_you_mean(unknown[0], names)}"
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in d
        ]
        if missing:
            raise SAEConfigError(f"Expected the fields {missing} in the config dict; got {d}.")
        return cls(**d)

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with ``changes`` applied (and validated)."""
        if "d_out" in changes and "apply_b_dec_to_input" not in changes:
            changes["apply_b_dec_to_input"] = None
        return dataclasses.replace(self, **changes)
