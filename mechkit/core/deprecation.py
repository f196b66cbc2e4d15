"""Old keyword names kept working, with a warning, when an argument is renamed."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from mechkit.errors import InvalidArgumentError

__all__ = ["renamed_arguments"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """A decorator that accepts each old keyword ``old=`` as its new name ``renames[old]``, with
    a :class:`DeprecationWarning`; both at once is an error.

    Example:
        >>> @renamed_arguments(clean_tokens="clean")
        ... def run(clean=None):
        ...     return clean
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     run(clean_tokens=[1, 2]), seen[0].category.__name__
        ([1, 2], 'DeprecationWarning')
    """

    def decorate(fn: F) -> F:
        names = list(inspect.signature(fn).parameters)
        position = {new: names.index(new) for new in renames.values()}  # where it sits

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs or len(args) > position[new]:
                    raise InvalidArgumentError(
                        f"Expected {new}= or its old name {old}=, not both; got both in "
                        f"{fn.__name__}(). Hint: pass {new}= only."
                    )
                warnings.warn(
                    f"{fn.__name__}({old}=...) is deprecated; use {new}=.",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
