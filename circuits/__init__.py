"""Reproductions of published circuits, one module per paper, built only on mechkit's public API.

Planned: ``induction`` (Olsson et al. 2022), ``ioi`` (Wang et al. 2022), ``greater_than``
(Hanna et al. 2023).
"""
