"""Each architecture's encode/decode/forward and training loss against plain re-implementations
written here, and the config's errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from mechkit.errors import MechkitError, ShapeError, UnknownKindError
from mechkit.sae import ARCHITECTURES, SAEConfig, SparseDictionary
from mechkit.sae.base import SAEConfigError

torch.set_num_threads(1)

D_IN, D_SAE, D_OUT, K = 12, 48, 10, 5
KINDS = ["sae", "transcoder", "skip"]


def make(arch: str, kind: str, seed: int = 0) -> SparseDictionary:
    """Random weights everywhere (biases and thresholds included), so no term can hide."""
    cfg = SAEConfig(
        architecture=arch,
        d_in=D_IN,
        d_sae=D_SAE,
        k=K if arch in ("topk", "batchtopk") else None,
        hook_name="blocks.0.ln2.hook_normalized" if kind != "sae" else "blocks.0.hook_resid_pre",
        d_out=None if kind == "sae" else D_OUT,
        out_hook_name=None if kind == "sae" else "blocks.0.hook_mlp_out",
        skip=kind == "skip",
    )
    sae = SparseDictionary.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b_") else 1.0))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.5)
    return sae


def reference_forward(sae: SparseDictionary, x: torch.Tensor):
    """encode / decode / forward written from the papers' formulas, with no shared code."""
    cfg = sae.cfg
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    x_in = x - b_dec if cfg.d_out is None else x
    z = x_in @ W_enc + b_enc
    f = torch.zeros_like(z)
    if cfg.architecture == "relu":
        f = torch.clamp(z, min=0)
    elif cfg.architecture == "topk":
        for idx in itertools.product(*(range(n) for n in z.shape[:-1])):
            row = z[idx]
            keep = sorted(range(D_SAE), key=lambda i: -row[i].item())[: cfg.k]
            for i in keep:
                f[idx + (i,)] = max(row[i].item(), 0.0)
    else:  # jumprelu, batchtopk at inference
        theta = sae.threshold
        f = torch.where(z > theta, z, torch.zeros_like(z))
    out = f @ W_dec + b_dec
    if cfg.skip:
        out = out + x @ sae.W_skip
    return f, f @ W_dec + b_dec, out


def test_registry_holds_the_four_architectures():
    assert set(ARCHITECTURES) == {"relu", "topk", "batchtopk", "jumprelu"}
    assert ARCHITECTURES["topk"].__name__ == "TopKSAE"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_encode_decode_forward_match_a_plain_implementation(arch, kind):
    sae = make(arch, kind)
    x = torch.randn(3, 4, D_IN, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        f_ref, dec_ref, out_ref = reference_forward(sae, x)
        f = sae.encode(x)
        torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
        assert f.shape == (3, 4, D_SAE)
        torch.testing.assert_close(sae.decode(f), dec_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), out_ref, atol=1e-5, rtol=1e-5)
    assert sae.is_transcoder == (kind != "sae")
    assert (f != 0).any() and (f == 0).any()  # the activation really selects
    if arch == "topk":
        assert ((f != 0).sum(-1) <= K).all()


def dense_training_loss(sae, x, y, *, dead, aux_k, aux_coef, coefficient):
    """The training losses written densely with ordinary autograd."""
    cfg = sae.cfg
    x_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
    z = x_in @ sae.W_enc + sae.b_enc
    if cfg.architecture == "topk":
        idx = z.detach().topk(cfg.k, dim=-1).indices
        mask = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
    elif cfg.architecture == "batchtopk":
        flat = z.detach().reshape(-1).topk(cfg.k * z.shape[0]).indices
        mask = torch.zeros(z.numel(), dtype=torch.bool).scatter_(0, flat, True).view_as(z)
    f = torch.where(mask, z.clamp(min=0), torch.zeros_like(z))
    y_hat = f @ sae.W_dec + sae.b_dec
    if cfg.skip:
        y_hat = y_hat + x @ sae.W_skip
    err = y - y_hat
    mse = (err**2).sum(-1).mean()
    n_dead = int(dead.sum())
    if n_dead == 0:
        return mse
    k_aux = min(aux_k, n_dead)
    zd = torch.where(dead, z, torch.full_like(z, float("-inf")))
    idx = zd.detach().topk(k_aux, dim=-1).indices
    amask = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
    a = torch.where(amask, z.clamp(min=0), torch.zeros_like(z))
    e_hat = a @ sae.W_dec
    aux = ((err.detach() - e_hat) ** 2).sum(-1).mean()
    return mse + aux_coef * aux


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_training_step_equals_dense_autograd(arch, kind, with_dead):
    """The sparse encoder/decoder backward (sparse_ops) gives the dense gradients."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, D_IN, generator=g)
    y = x if kind == "sae" else torch.randn(16, D_OUT, generator=g)
    dead = torch.rand(D_SAE, generator=g) < 0.5 if with_dead else torch.zeros(D_SAE, dtype=bool)
    kw = {"dead": dead, "aux_k": 7, "aux_coefficient": 0.25}
    ours, ref = make(arch, kind), make(arch, kind)
    out = ours.training_step(x, y, coefficient=0.0, n_dead=int(dead.sum()), **kw)
    out.loss.backward()
    loss = dense_training_loss(ref, x, y, dead=dead, aux_k=7, aux_coef=0.25, coefficient=0.0)
    loss.backward()
    torch.testing.assert_close(out.loss, loss, atol=1e-4, rtol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    if arch == "topk":
        assert out.l0.item() <= K


def test_relu_loss_is_mse_plus_decoder_norm_weighted_l1():
    sae = make("relu", "sae")
    x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(1))
    out = sae.training_step(
        x, x, coefficient=0.7, dead=None, n_dead=0, aux_k=1, aux_coefficient=0.0
    )
    f = torch.clamp((x - sae.b_dec) @ sae.W_enc + sae.b_enc, min=0)
    mse = ((x - f @ sae.W_dec - sae.b_dec) ** 2).sum(-1).mean()
    l1 = sum(f[:, i] * sae.W_dec[i].norm() for i in range(D_SAE)).mean()
    torch.testing.assert_close(out.loss, mse + 0.7 * l1)
    torch.testing.assert_close(out.l0, (f > 0).sum(-1).float().mean())


def test_jumprelu_straight_through_gradients_follow_the_paper():
    """d loss / d theta by the paper's estimators, computed here element by element."""
    sae = make("jumprelu", "sae")
    eps = 0.001
    with torch.no_grad():  # put some pre-activations within eps/2 of the threshold
        sae.b_enc.zero_()
        sae.threshold.fill_(0.5)
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(2))
    z = ((x - sae.b_dec) @ sae.W_enc).detach()
    with torch.no_grad():
        sae.threshold.copy_(z[0] + 0.0002)  # row 0 sits just below every threshold
    lam = 0.3
    out = sae.training_step(x, x, coefficient=lam, dead=None, n_dead=0, aux_k=1, aux_coefficient=0)
    out.loss.backward()
    theta = sae.threshold.detach()
    f = z * (z > theta)
    err = x - (f @ sae.W_dec + sae.b_dec).detach()
    d_f = -2 * err @ sae.W_dec.detach().T / x.shape[0]  # d mse / d f
    expected = torch.zeros(D_SAE)
    for b in range(x.shape[0]):
        for i in range(D_SAE):
            u = (z[b, i] - theta[i]) / eps
            kernel = 1.0 if -0.5 < u < 0.5 else 0.0
            expected[i] += d_f[b, i] * -(theta[i] / eps) * kernel
            expected[i] += lam / x.shape[0] * -(1 / eps) * kernel
    assert expected.abs().sum() > 0  # the kernel was hit
    torch.testing.assert_close(sae.threshold.grad, expected, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.l0, (z > theta).sum(-1).float().mean())


def test_batchtopk_keeps_k_per_row_on_average_and_learns_a_threshold():
    sae = make("batchtopk", "sae")
    with torch.no_grad():
        sae.threshold.zero_()
    x = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(4))
    f = sae.batch_topk(sae.pre_activations(x))
    assert (f != 0).sum() <= K * 32 and (f != 0).sum(-1).float().std() > 0  # rows differ
    sae.training_step(x, x, coefficient=0, dead=None, n_dead=0, aux_k=1, aux_coefficient=0)
    smallest = f[f > 0].min().item()
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), smallest))  # first batch
    x2 = torch.randn(32, D_IN, generator=torch.Generator().manual_seed(5))
    f2 = sae.batch_topk(sae.pre_activations(x2))
    sae.training_step(x2, x2, coefficient=0, dead=None, n_dead=0, aux_k=1, aux_coefficient=0)
    expected = 0.99 * smallest + 0.01 * f2[f2 > 0].min().item()
    torch.testing.assert_close(sae.threshold, torch.full((D_SAE,), expected))


def test_config_round_trips_and_resolves_apply_b_dec():
    cfg = make("topk", "skip").cfg
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.apply_b_dec_to_input is False  # transcoders never subtract b_dec
    assert make("relu", "sae").cfg.apply_b_dec_to_input is True


def base_kwargs(**changes):
    kw = {"architecture": "topk", "d_in": 8, "d_sae": 16, "k": 2, "hook_name": "blocks.0.mlp"}
    kw.update(changes)
    return kw


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"architecture": "topkk"}, UnknownKindError, "Did you mean 'topk'"),
        ({"architecture": "jump_relu"}, ValueError, "Did you mean 'jumprelu'"),
        ({"k": None}, SAEConfigError, "needs k"),
        ({"k": 17}, SAEConfigError, "k <= d_sae"),
        ({"architecture": "relu"}, SAEConfigError, "k=None"),
        ({"d_in": 0}, SAEConfigError, "d_in to be a positive int"),
        ({"skip": True}, SAEConfigError, "d_out"),
        ({"out_hook_name": "blocks.0.hook_mlp_out"}, SAEConfigError, "d_out"),
        ({"d_out": 8, "apply_b_dec_to_input": True}, SAEConfigError, "transcoder"),
        ({"dtype": "float33"}, SAEConfigError, "float32"),
        ({"hook_name": ""}, SAEConfigError, "hook_name"),
    ],
)
def test_bad_configs_raise_clear_errors(changes, error, match):
    with pytest.raises(error, match=match) as info:
        SAEConfig(**base_kwargs(**changes))
    assert isinstance(info.value, MechkitError)


def test_wrong_input_width_raises_a_shape_error():
    sae = make("topk", "sae")
    with pytest.raises(ShapeError, match=r"\(\.\.\., 12\).*got \(2, 7\)"):
        sae.encode(torch.randn(2, 7))
    with pytest.raises(ShapeError, match="latents"):
        sae.decode(torch.randn(2, 7))
    with pytest.raises(SAEConfigError, match="from_config"):
        ARCHITECTURES["relu"](sae.cfg)
