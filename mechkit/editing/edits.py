"""Weight edits as objects: what ROME and MEMIT return.

A :class:`WeightEdit` holds the change of each edited parameter (``blocks.L.mlp.W_out``) and a
record of how it was made. It changes no model until it is applied, and it is applied in a
scope, ``with mk.edit(model, edit):``, which puts every parameter back bitwise on exit (by any
route: the parameters are copied before the edit and copied back after), or by hand with
``handle = edit.apply(model)`` and ``handle.revert()``. Edits are saved as safetensors (the
changes) with their record as JSON in the file's metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mechkit.atomic_io import write_atomically
from mechkit.core.types import Model
from mechkit.errors import InvalidArgumentError, InvalidTypeError, ShapeError, did_you_mean
from mechkit.reading import read_safetensors, reading

__all__ = ["WeightEdit", "AppliedEdit", "edit"]


@dataclasses.dataclass(frozen=True, eq=False)
class WeightEdit:
    """Changes to a model's parameters, applied only through :meth:`apply` or :func:`edit`.

    Attributes:
        deltas: parameter name (as ``model.named_parameters()`` names it) -> the change.
        method: ``"ROME"`` or ``"MEMIT"``.
        requests: one line per fact edited (``"The capital of France is: Paris -> Rome"``).
        keys, values: ROME's ``k*`` and ``v*`` (MEMIT's keys and target residuals, per layer
            and fact), kept for checks; name -> tensor.
        record: how it was made (layers, covariance, hyperparameters), JSON-able.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> e = WeightEdit({"blocks.0.attn.W_O": torch.ones(4, 32, 128)}, "by hand", ("x",))
        >>> before = model.blocks[0].attn.W_O.clone()
        >>> with mk.edit(model, e):
        ...     bool((model.blocks[0].attn.W_O == before + 1).all())
        True
        >>> torch.equal(model.blocks[0].attn.W_O, before)   # put back bitwise
        True
    """

    deltas: dict[str, Tensor]
    method: str
    requests: tuple[str, ...] = ()
    keys: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    values: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        names = ", ".join(self.deltas)
        return f"WeightEdit({self.method}, {len(self.requests)} request(s), on {names})"

    def norm(self) -> float:
        """The Frobenius norm of all changes together."""
        return float(sum(float((d.double() ** 2).sum()) for d in self.deltas.values()) ** 0.5)

    def apply(self, model: Model) -> AppliedEdit:
        """Add the changes to ``model``'s parameters; the returned handle's ``revert()`` puts
        them back bitwise.

        Example:
            >>> model = mk.load_model("attn-only-2l")
            >>> before = model.W_U.clone()
            >>> handle = WeightEdit({"unembed.W_U": torch.ones(128, 500)}, "x").apply(model)
            >>> handle.revert(); torch.equal(model.W_U, before)
            True
        """
        params = dict(model.named_parameters())
        for name, delta in self.deltas.items():
            if name not in params:
                raise InvalidArgumentError(
                    f"Expected edits of this model's parameters; it has no {name!r}."
                    + did_you_mean(name, params)
                )
            if params[name].shape != delta.shape:
                raise ShapeError(
                    f"Expected the change of {name} to have its shape "
                    f"{tuple(params[name].shape)}; got {tuple(delta.shape)}."
                )
        saved = {name: params[name].detach().clone() for name in self.deltas}
        handle = AppliedEdit(model, saved)
        try:
            with torch.no_grad():
                for name, delta in self.deltas.items():
                    p = params[name]
                    p.add_(delta.to(device=p.device, dtype=p.dtype))
        except BaseException:
            handle.revert()
            raise
        return handle

    def save(self, path: str | Path) -> Path:
        """Write the edit to ``path`` (safetensors; the record as JSON in its metadata).

        Example:
            >>> import tempfile
            >>> e = WeightEdit({"unembed.W_U": torch.ones(2, 3)}, "ROME", ("a: b -> c",),
            ...                record={"layer": 4})
            >>> back = WeightEdit.load(e.save(Path(tempfile.mkdtemp()) / "edit.safetensors"))
            >>> back.method, back.requests, back.record, torch.equal(back.deltas["unembed.W_U"],
            ...                                                      e.deltas["unembed.W_U"])
            ('ROME', ('a: b -> c',), {'layer': 4}, True)
        """
        from safetensors.torch import save_file

        tensors = {f"delta/{k}": v for k, v in self.deltas.items()}
        tensors.update({f"key/{k}": v for k, v in self.keys.items()})
        tensors.update({f"value/{k}": v for k, v in self.values.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"method": self.method, "requests": list(self.requests), "record": self.record}
        return write_atomically(
            path, lambda tmp: save_file(tensors, tmp, metadata={"edit": json.dumps(meta)})
        )

    @classmethod
    def load(cls, path: str | Path) -> WeightEdit:
        """Read an edit written by :meth:`save`."""
        hint = "write it with WeightEdit.save"
        tensors, metadata = read_safetensors(path, "a weight edit", hint)
        with reading(path, "a weight edit", hint):
            meta = json.loads(metadata["edit"])
            parts: dict[str, dict[str, Tensor]] = {"delta": {}, "key": {}, "value": {}}
            for name, tensor in tensors.items():
                kind, _, rest = name.partition("/")
                parts[kind][rest] = tensor
            return cls(
                parts["delta"], str(meta["method"]), tuple(meta["requests"]), parts["key"],
                parts["value"], dict(meta["record"]),
            )  # fmt: skip


class AppliedEdit:
    """A handle on an applied edit: :meth:`revert` copies the saved parameters back (once;
    again is a no-op).

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> handle = WeightEdit({"unembed.W_U": torch.ones(128, 500)}, "x").apply(model)
        >>> handle.active, handle.revert(), handle.active
        (True, None, False)
    """

    def __init__(self, model: Model, saved: dict[str, Tensor]) -> None:
        self.model = model
        self.saved = saved
        self.active = True

    def revert(self) -> None:
        if not self.active:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, original in self.saved.items():
                params[name].copy_(original)
        self.active = False


@contextlib.contextmanager
def edit(model: Model, edits: WeightEdit | Sequence[WeightEdit]) -> Iterator[Model]:
    """Apply ``edits`` (in order) for the block; on leaving it by any route every parameter is
    put back bitwise.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> e = WeightEdit({"unembed.W_U": torch.ones(128, 500)}, "by hand")
        >>> tokens = torch.tensor([[1, 2, 3]])
        >>> before = model(tokens)
        >>> with mk.edit(model, [e, e]):
        ...     bool((model(tokens) != before).any())
        True
        >>> torch.equal(model(tokens), before)
        True
    """
    if isinstance(edits, WeightEdit):
        edits = [edits]
    if not all(isinstance(e, WeightEdit) for e in edits):
        raise InvalidTypeError(
            "Expected a WeightEdit or a list of them (from mk.editing.rome or memit); got "
            f"{[type(e).__name__ for e in edits]}."
        )
    handles: list[AppliedEdit] = []
    try:
        for e in edits:
            handles.append(e.apply(model))
        yield model
    finally:
        for handle in reversed(handles):
            handle.revert()
