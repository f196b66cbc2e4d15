"""Hook scopes that leave the model as they found it, even after a Ctrl-C.

TransformerLens's ``model.hooks()`` removes its hooks in a ``finally`` block, which is enough for
ordinary exceptions. A ``KeyboardInterrupt`` can arrive while that cleanup itself runs (about
one Ctrl-C in 300 did, in a loop of patching runs) and then some hooks stay on the model, where
they silently change every later forward pass.

:func:`hook_scope` and :func:`keep_hooks` record, on entry, which hooks every hook point of the
model carries (TransformerLens's handle lists and torch's own hook dictionaries) and restore
exactly that on exit by any route. The restore is idempotent and runs in a loop that an
interrupt cannot break: an interrupt that arrives during the restore starts it again and is
raised once the model is clean. Other cleanups (configuration flags switched on for a run) ride
along through ``keep_hooks(model, on_exit=...)``.

Every mechkit function that adds hooks does it through :func:`hook_scope`, and records
activations through :func:`run_with_cache` (TransformerLens's own uses ``model.hooks()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["hook_scope", "keep_hooks", "run_with_cache"]

HookSpec = Sequence[tuple[Any, Callable[..., Any]]]


_TORCH_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_NONE: frozenset[int] = frozenset()

# One hook point's record: (point, TransformerLens's fwd handles, bwd handles, the keys of each
# torch hook dict, torch's full-backward flag). Plain tuples: a model has hundreds of points.
_PointState = tuple[Any, tuple[Any, ...], tuple[Any, ...], tuple[frozenset[int], ...], Any]


def _snapshot(model: HookedTransformer) -> tuple[list[_PointState], tuple[Any, Any]]:
    points = []
    for hp in model.hook_dict.values():
        table = hp.__dict__  # nn.Module keeps its hook dicts as instance attributes
        keys = tuple(frozenset(d) if (d := table.get(n)) else _NONE for n in _TORCH_DICTS)
        full = table.get("_is_full_backward_hook")
        points.append((hp, tuple(hp.fwd_hooks), tuple(hp.bwd_hooks), keys, full))
    return points, (getattr(model, "context_level", None), getattr(model, "is_caching", None))


def _unchanged(hp: Any, fwd: tuple[Any, ...], bwd: tuple[Any, ...], keys: tuple) -> bool:
    """True when ``hp`` still carries exactly the recorded hooks (the common case: skip it)."""
    if len(hp.fwd_hooks) != len(fwd) or len(hp.bwd_hooks) != len(bwd):
        return False
    if not all(a is b for a, b in zip(hp.fwd_hooks + hp.bwd_hooks, fwd + bwd, strict=True)):
        return False
    table = hp.__dict__
    return all(
        (frozenset(d) if (d := table.get(n)) else _NONE) == k
        for n, k in zip(_TORCH_DICTS, keys, strict=True)
    )


def _restore(model: HookedTransformer, snapshot: tuple[list[_PointState], tuple[Any, Any]]) -> None:
    """Put every hook point back as recorded; safe to run again after being cut short."""
    points, (level, caching) = snapshot
    for hp, fwd, bwd, keys, full in points:
        if _unchanged(hp, fwd, bwd, keys):
            continue
        kept = set(map(id, fwd + bwd))
        for handle in list(hp.fwd_hooks) + list(hp.bwd_hooks):
            if id(handle) not in kept:
                handle.hook.remove()
        for name, recorded in zip(_TORCH_DICTS, keys, strict=True):
            table = getattr(hp, name, None)
            if table is None:
                continue
            for key in [k for k in table if k not in recorded]:
                table.pop(key, None)
        hp.fwd_hooks = list(fwd)
        hp.bwd_hooks = list(bwd)
        if full is not None:
            hp._is_full_backward_hook = full
    if level is not None:
        model.context_level = level
    if caching is not None:
        model.is_caching = caching


@contextlib.contextmanager
def keep_hooks(
    model: HookedTransformer, *, on_exit: Callable[[], None] | None = None
) -> Iterator[Any]:
    """On leaving the block by any route, the model carries exactly the hooks it had on entry.

    Args:
        model: the HookedTransformer.
        on_exit: another idempotent cleanup run with the restore (say, a configuration flag put
            back), under the same protection against interrupts.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> with keep_hooks(model):
        ...     model.add_hook("blocks.0.hook_resid_post", lambda act, hook: act * 0)
        >>> len(model.blocks[0].hook_resid_post.fwd_hooks)
        0
    """
    snapshot = _snapshot(model)
    try:
        yield model
    finally:
        # The loop is written out here, not called: Python delivers a pending Ctrl-C when a
        # function starts, so a call made before the ``try`` could be cut short. Inside the
        # ``try`` an interrupt only restarts the (idempotent) restore.
        interrupted = False
        while True:
            try:
                _restore(model, snapshot)
                if on_exit is not None:
                    on_exit()
                break
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt


@contextlib.contextmanager
def hook_scope(
    model: HookedTransformer, fwd_hooks: HookSpec = (), bwd_hooks: HookSpec = ()
) -> Iterator[Any]:
    """Hooks on ``model`` for the block, removed on exit by any route, a Ctrl-C included.

    The hooks are added straight to the hook points and removed by :func:`keep_hooks`'s
    restore, not by TransformerLens's ``model.hooks()``: a Ctrl-C that cuts that generator's
    exit short leaves its ``finally`` to run later, after ours, where it would lower the
    model's hook context level once more.

    Args:
        model: the HookedTransformer.
        fwd_hooks: ``(hook name or name filter, hook function)`` pairs, as TransformerLens takes.
        bwd_hooks: the same for the backward pass.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> seen = []
        >>> hook = lambda act, hook: seen.append(act.shape)
        >>> with hook_scope(model, fwd_hooks=[("blocks.0.hook_resid_post", hook)]):
        ...     _ = model(torch.tensor([[1, 2, 3]]))
        >>> seen, len(model.blocks[0].hook_resid_post.fwd_hooks)   # the hook is gone
        ([torch.Size([1, 3, 128])], 0)
    """
    with keep_hooks(model):
        for name, hook in fwd_hooks:
            model.add_hook(name, hook, dir="fwd")
        for name, hook in bwd_hooks:
            model.add_hook(name, hook, dir="bwd")
        yield model


def run_with_cache(
    model: HookedTransformer, *args: Any, names_filter: Any = None, **kwargs: Any
) -> tuple[Any, dict[str, Any]]:
    """``model.run_with_cache(...)`` through :func:`hook_scope`: the forward pass's output and
    ``{hook name: detached activation}`` for the hooks ``names_filter`` picks (a name, a list
    of names, a predicate, or None for all). The caching hooks never outlive the call, even
    when it is interrupted.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> logits, cache = run_with_cache(model, torch.tensor([[1, 2]]),
        ...                                names_filter="blocks.0.hook_resid_post")
        >>> list(cache), cache["blocks.0.hook_resid_post"].shape   # (batch, pos, d_model)
        (['blocks.0.hook_resid_post'], torch.Size([1, 2, 128]))
    """
    if names_filter is None:
        wanted: Callable[[str], bool] = lambda name: True  # noqa: E731
    elif isinstance(names_filter, str):
        wanted = lambda name: name == names_filter  # noqa: E731
    elif callable(names_filter):
        wanted = names_filter
    else:
        names = set(names_filter)
        wanted = lambda name: name in names  # noqa: E731
    cache: dict[str, Any] = {}

    def keep(activation: Any, hook: Any) -> None:
        cache[hook.name] = activation.detach()

    with hook_scope(model, fwd_hooks=[(wanted, keep)]):
        output = model(*args, **kwargs)
    return output, cache
