"""Sparse encoder and decoder steps for TopK-style training, where only a few latents fire.

A TopK SAE needs the dense pre-activations ``x @ W_enc`` once, to choose the ``k`` winners of
each row; everything after that touches only the ``nnz = batch * k`` winners. Written densely
(as sae-lens does) the decode, its two backward products and the encoder's weight gradient
are four more ``(batch, d_in, d_sae)`` matrix products. Here:

- :func:`gather_pre_activations` returns the winners' pre-activations with an autograd
  backward that builds the encoder gradients from the ``nnz`` entries only: ``dW_enc = x^T G``
  with ``G`` a sparse ``(batch, d_sae)`` matrix, ``db_enc`` an index-add, and ``db_dec`` (when
  the decoder bias is subtracted from the input) ``-W_enc @ db_enc``.
- :func:`sparse_decode` is ``sum_j f_j W_dec[i_j]`` through ``embedding_bag`` (fixed ``k``
  per row, or per-row counts through ``offsets``), whose backward is also ``O(nnz * d_out)``.

Cost per step: one dense product plus ``O(nnz * d)`` work, instead of five dense products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["gather_pre_activations", "sparse_decode"]


class _GatherPre(torch.autograd.Function):
    """``pre[rows, cols]`` of ``pre = (x - b_in) @ W_enc + b_enc``, given the values already
    computed; the backward is sparse. ``x`` gets no gradient (it is data)."""

    @staticmethod
    def forward(ctx, values, x_in, W_enc, b_enc, b_in, rows, cols):  # noqa: ARG004
        ctx.save_for_backward(x_in, W_enc, rows, cols)
        ctx.has_b_in = b_in is not None
        ctx.shapes = (W_enc.shape, b_enc.shape)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        x_in, W_enc, rows, cols = ctx.saved_tensors
        d_in, d_sae = ctx.shapes[0]
        grad = grad.reshape(-1)
        g_w = g_b = g_bin = None
        if ctx.needs_input_grad[2]:
            sparse = torch.sparse_coo_tensor(
                torch.stack([cols, rows]),
                grad.to(x_in.dtype),
                (d_sae, x_in.shape[0]),
                check_invariants=False,
            )
            g_w = torch.sparse.mm(sparse, x_in).T.to(W_enc.dtype)  # (d_in, d_sae)
        if ctx.needs_input_grad[3] or (ctx.has_b_in and ctx.needs_input_grad[4]):
            g_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
            g_b.index_add_(0, cols, grad)
            if ctx.has_b_in and ctx.needs_input_grad[4]:
                g_bin = -(W_enc @ g_b.to(W_enc.dtype))  # (d_in,)
            g_b = g_b.to(W_enc.dtype) if ctx.needs_input_grad[3] else None
        return None, None, g_w, g_b, g_bin, None, None


def gather_pre_activations(
    values: Float[Tensor, " nnz"],
    x_in: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    b_in: Float[Tensor, " d_in"] | None,
    rows: Int[Tensor, " nnz"],
    cols: Int[Tensor, " nnz"],
) -> Float[Tensor, " nnz"]:
    """``values`` (the pre-activations at ``(rows, cols)``), differentiable in the weights.

    ``x_in`` is the encoder's input *after* subtracting ``b_in`` (the decoder bias, or None),
    exactly as used to compute ``values``; gradients flow to ``W_enc``, ``b_enc`` and ``b_in``.

    Example:
        >>> x, w, b = torch.randn(2, 4), torch.randn(4, 6, requires_grad=True), torch.zeros(6)
        >>> rows, cols = torch.tensor([0, 1]), torch.tensor([5, 2])
        >>> values = (x @ w + b).detach()[rows, cols]
        >>> out = gather_pre_activations(values, x, w, b, None, rows, cols)
        >>> torch.allclose(out, values), w.grad is None
        (True, True)
        >>> out.sum().backward()
        >>> torch.allclose(w.grad[:, 5], x[0]) and torch.allclose(w.grad[:, 2], x[1])
        True
    """
    return _GatherPre.apply(values, x_in.detach(), W_enc, b_enc, b_in, rows, cols)


def sparse_decode(
    cols: Int[Tensor, "..."],
    acts: Float[Tensor, "..."],
    W_dec: Float[Tensor, "d_sae d_out"],
    offsets: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, "batch d_out"]:
    """``sum_j acts[b, j] * W_dec[cols[b, j]]`` per row ``b`` (no bias).

    ``cols``/``acts`` are ``(batch, k)``, or flat ``(nnz,)`` with ``offsets`` (row starts, rows
    sorted) for a varying number of latents per row.

    Example:
        >>> w_dec = torch.eye(4)                                       # (d_sae, d_out)
        >>> sparse_decode(torch.tensor([[0, 3]]), torch.tensor([[2.0, 5.0]]), w_dec)
        tensor([[2., 0., 0., 5.]])
    """
    return F.embedding_bag(
        cols, W_dec, offsets, mode="sum", per_sample_weights=acts.to(W_dec.dtype)
    )
