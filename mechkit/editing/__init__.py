"""Where facts live and how to edit them: causal tracing, ROME and MEMIT.

- :mod:`~mechkit.editing.facts`: the built-in facts, the CounterFact loader, tokenized facts.
- :mod:`~mechkit.editing.tracing`: :func:`causal_trace` and :class:`TraceResult`.
- :mod:`~mechkit.editing.rome`: :func:`rome`, one fact in one MLP;
  :mod:`~mechkit.editing.covariance`: the keys' second moment it uses.
- :mod:`~mechkit.editing.memit`: :func:`memit`, many facts over a range of layers.
- :mod:`~mechkit.editing.evaluation`: :func:`evaluate_edits`, CounterFact's scores.
- :mod:`~mechkit.editing.edits`: :class:`WeightEdit`, applied in a scope with :func:`edit`.
"""

from mechkit.editing.covariance import key_covariance
from mechkit.editing.demo import demo_section
from mechkit.editing.edits import AppliedEdit, WeightEdit, edit
from mechkit.editing.evaluation import EditEvaluation, evaluate_edits
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
from mechkit.editing.memit import memit
from mechkit.editing.rome import RomeConfig, rome, rome_update
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
    "key_covariance",
    "AppliedEdit",
    "WeightEdit",
    "edit",
    "RomeConfig",
    "rome",
    "rome_update",
    "memit",
    "EditEvaluation",
    "evaluate_edits",
    "demo_section",
]
