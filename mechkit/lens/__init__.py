"""Lenses on the residual stream: the logit lens and the tuned lens."""

from mechkit.lens.logit_lens import LogitLens, decode_residual, logit_lens

__all__ = ["LogitLens", "decode_residual", "logit_lens"]
