"""Reproductions of published circuits, one module per paper, built only on mechkit's public API.

``induction`` (Olsson et al. 2022) with ``induction_phase_change``, ``ioi`` (Wang et al. 2022),
``greater_than`` (Hanna et al. 2023), ``successor_heads`` (Gould et al. 2023), and ``demo``:
their sections of ``mechkit demo``.

This folder is the package ``circuits`` in a checkout and installs as ``mechkit_circuits`` (a
top-level ``circuits`` would clash with an unrelated PyPI project), so its modules import each
other relatively. mechkit never imports it: the package registers its command lines and demo
sections under the entry-point groups ``mechkit.reproductions`` and ``mechkit.demo_sections``
(see pyproject.toml), which ``mechkit reproduce NAME`` and ``mechkit demo`` read::

    mechkit reproduce ioi --model smollm2-135m --out reports/ioi --prompts 32
    python -m circuits.ioi ...            # the same, from a checkout
    python -m mechkit_circuits.ioi ...    # the same, installed
"""
