"""Where facts live and how to edit them: causal tracing, ROME and MEMIT.

- :mod:`~mechkit.editing.facts`: the built-in facts, the CounterFact loader, tokenized facts.
- :mod:`~mechkit.editing.tracing`: :func:`causal_trace` and :class:`TraceResult`.
"""

from mechkit.editing.facts import (
    BUILTIN_FACTS,
    Fact,
    TokenizedFact,
    builtin_facts,
    known_facts,
    load_facts,
    tokenize_fact,
    tokenize_facts,
)
from mechkit.editing.tracing import KINDS, TOKEN_CLASSES, TraceResult, causal_trace

__all__ = [
    "BUILTIN_FACTS",
    "Fact",
    "TokenizedFact",
    "builtin_facts",
    "known_facts",
    "load_facts",
    "tokenize_fact",
    "tokenize_facts",
    "KINDS",
    "TOKEN_CLASSES",
    "TraceResult",
    "causal_trace",
]
