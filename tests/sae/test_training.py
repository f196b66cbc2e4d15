"""Training: a killed run resumed equals an uninterrupted one (bitwise), seeds reproduce, TopK
recovers planted features, schedules, dead-latent counts, the folded normalisation, errors."""

from __future__ import annotations

import math

import pytest
import torch

from mechkit.errors import MechkitError, ShapeError
from mechkit.sae import SAEConfig, SparseDictionary, TrainConfig, train_sae
from mechkit.sae.training import TrainConfigError, _lr_factor, geometric_median

torch.set_num_threads(1)

D = 16


def planted(n: int, seed: int = 0, d: int = D, n_features: int = 64, p: float = 0.05):
    """Sparse sums of fixed unit directions plus an offset: a dictionary should find them."""
    g = torch.Generator().manual_seed(100)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=-1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    coef = (torch.rand(n, n_features, generator=g) < p) * torch.rand(n, n_features, generator=g)
    return coef * 3 @ features + 0.3


def config(arch: str, kind: str = "sae") -> SAEConfig:
    return SAEConfig(
        architecture=arch,
        d_in=D,
        d_sae=96,
        k=4 if arch in ("topk", "batchtopk") else None,
        hook_name="blocks.0.ln2.hook_normalized",
        d_out=None if kind == "sae" else D - 3,
        out_hook_name=None if kind == "sae" else "blocks.0.hook_mlp_out",
        skip=kind == "skip",
    )


def data_for(cfg: SAEConfig, n: int = 3000):
    x = planted(n)
    if not cfg.is_transcoder:
        return x
    y = torch.tanh(x[:, : cfg.d_out]) * 2 + x[:, 3:] * 0.5  # some fixed nonlinear map
    return (x, y)


TRAIN = TrainConfig(
    total_tokens=200 * 23,
    batch_size=200,
    log_every=2,
    checkpoint_every=4,
    dead_after_tokens=600,
    aux_k=8,
    progress=False,
)


@pytest.mark.parametrize(
    ("arch", "kind"),
    [("topk", "sae"), ("batchtopk", "skip"), ("jumprelu", "transcoder"), ("relu", "sae")],
)
def test_resumed_training_equals_uninterrupted_training(arch, kind, tmp_path):
    cfg = config(arch, kind)
    data = data_for(cfg)
    whole = train_sae(cfg, data, TRAIN)
    ckpt = tmp_path / "ckpt"
    # killed after 10 steps (last checkpoint at step 8), then after 5 more, then run to the end
    first = train_sae(cfg, data, TRAIN, checkpoint_dir=ckpt, stop_after_steps=10)
    assert first.result.tokens == 10 * 200
    second = train_sae(cfg, data, TRAIN, checkpoint_dir=ckpt, stop_after_steps=5)
    assert second.result.tokens == 13 * 200  # resumed at 8
    last = train_sae(cfg, data, TRAIN, checkpoint_dir=ckpt)
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(last.sae.state_dict()[name], tensor), name
    drop = ("seconds",)
    strip = [{k: v for k, v in r.items() if k not in drop} for r in whole.result.history]
    assert [{k: v for k, v in r.items() if k not in drop} for r in last.result.history] == strip
    assert last.result.tokens == whole.result.tokens == 23 * 200


def test_the_seed_fixes_the_result():
    cfg, data = config("topk"), planted(2000)
    short = TrainConfig(total_tokens=2000, batch_size=200, progress=False, seed=1)
    a = train_sae(cfg, data, short).sae
    b = train_sae(cfg, data, short).sae
    c = train_sae(cfg, data, TrainConfig(**{**short.to_dict(), "seed": 2})).sae
    assert torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_enc, c.W_enc)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_learns_planted_features_on_held_out_data(arch):
    cfg = config(arch)
    train = TrainConfig(
        total_tokens=400_000, batch_size=500, progress=False, dead_after_tokens=5000
    )
    trained = train_sae(cfg, planted(20_000), train)
    x = planted(4000, seed=9)  # held out
    with torch.no_grad():
        x_hat, f = trained.sae(x), trained.sae.encode(x)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.8, ev
    assert (f != 0).sum(-1).float().mean() <= 4.0 + (0.8 if arch == "batchtopk" else 0)
    summary = trained.result.summary()
    assert summary["tokens"] == 400_000 and summary["final_l0"] <= 4.0 + 1e-6


def test_fold_input_scale_keeps_latents_and_outputs():
    """Training-time scaling folded into the weights: f(x) and y(x) on raw inputs are those of
    the unfolded dictionary on scaled inputs, unscaled."""
    for arch, kind in [("relu", "sae"), ("jumprelu", "skip"), ("topk", "transcoder")]:
        sae = SparseDictionary.from_config(config(arch, kind), seed=3)
        with torch.no_grad():
            sae.b_dec.normal_()
            sae.b_enc.normal_()
        x = torch.randn(5, D)
        s_in, s_out = 2.5, 0.4 if kind != "sae" else 2.5
        f_ref, y_ref = sae.encode(x * s_in), sae(x * s_in) / s_out
        sae.fold_input_scale(s_in, s_out)
        torch.testing.assert_close(sae.encode(x), f_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sae(x), y_ref, atol=1e-5, rtol=1e-5)


def test_learning_rate_warms_up_and_decays_linearly():
    cfg = TrainConfig(lr_warmup_fraction=0.1, lr_decay_fraction=0.2)
    factors = [_lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[50] == 1.0
    assert factors[80] == 1.0 and factors[81] == pytest.approx(19 / 20)
    assert factors[99] == pytest.approx(1 / 20)


def test_geometric_median_minimises_summed_distances():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(50, 3, generator=g), torch.full((5, 3), 40.0)])  # outliers
    m = geometric_median(points)

    def cost(p):
        return (points - p).norm(dim=-1).sum().item()

    for _ in range(20):  # no nearby point does better
        assert cost(m) <= cost(m + 0.05 * torch.randn(3, generator=g)) + 1e-4
    assert (m - points[:50].mean(0)).norm() < (points.mean(0) - points[:50].mean(0)).norm()


def test_dead_latents_are_counted():
    """Latents whose encoder can never fire (zero weights, very negative bias) are dead."""
    cfg = SAEConfig(architecture="relu", d_in=D, d_sae=32, hook_name="blocks.0.hook_resid_pre")
    sae = SparseDictionary.from_config(cfg, seed=0)
    with torch.no_grad():
        sae.W_enc[:, :10] = 0
        sae.b_enc[:10] = -1e4
        sae.b_enc[10:] = 1e3  # the others always fire
    train = TrainConfig(
        total_tokens=2000,
        batch_size=100,
        lr=1e-9,
        log_every=5,
        dead_after_tokens=1000,
        b_dec_init="zeros",
        progress=False,
    )
    history = train_sae(sae, planted(1000), train).result.history
    # rows seen at the logs: 500, 1000, 1500, 2000; dead once 1000 rows passed without a firing
    assert [row["dead"] for row in history] == [0, 10, 10, 10]


def test_result_frame_and_plot():
    trained = train_sae(config("topk"), planted(1000), TrainConfig(total_tokens=2000,
                        batch_size=200, log_every=5, progress=False))  # fmt: skip
    df = trained.result.to_dataframe()
    assert list(df["step"]) == [5, 10] and {"l0", "explained_variance", "dead"} <= set(df.columns)
    assert len(trained.result.plot().data) == 3


def test_bad_training_inputs_raise_clear_errors(tmp_path):
    cfg = config("topk")
    with pytest.raises(TrainConfigError, match="multiple of log_every"):
        TrainConfig(log_every=10, checkpoint_every=15)
    with pytest.raises(TrainConfigError, match="lr_warmup_fraction"):
        TrainConfig(lr_warmup_fraction=1.5)
    with pytest.raises(ShapeError, match=r"\(batch, 16\)"):
        train_sae(cfg, torch.randn(100, 8), TrainConfig(total_tokens=100, progress=False))
    tc = config("topk", "transcoder")
    with pytest.raises(ShapeError, match="pairs"):
        train_sae(tc, planted(400), TrainConfig(total_tokens=200, batch_size=100, progress=False))
    with pytest.raises(TrainConfigError, match="ended after 2"):
        batches = [planted(100) for _ in range(2)]
        train_sae(cfg, batches, TrainConfig(total_tokens=1000, batch_size=100, progress=False))
    train_sae(cfg, planted(400), TRAIN, checkpoint_dir=tmp_path, stop_after_steps=4)
    with pytest.raises(MechkitError, match="same dictionary"):
        train_sae(config("batchtopk"), planted(400), TRAIN, checkpoint_dir=tmp_path)
    assert math.isfinite(TRAIN.aux_coefficient)


def test_batchtopk_threshold_is_calibrated_on_the_final_weights():
    """A short run's moving average keeps early thresholds; the calibration pass sets the
    threshold to the mean over training batches of each batch's smallest kept value (checked
    against a loop here), so inference fires about k latents per row."""
    cfg = config("batchtopk")
    x = planted(3000)
    short = TrainConfig(total_tokens=200 * 30, batch_size=200, progress=False)
    plain = train_sae(cfg, x, TrainConfig(**{**short.to_dict(), "calibration_batches": 0})).sae
    calibrated = train_sae(cfg, x, short).sae
    for name, value in plain.state_dict().items():  # the same run, only the threshold differs
        if name != "threshold":
            torch.testing.assert_close(calibrated.state_dict()[name], value)
    from mechkit.sae.training import _batches

    smallest = []
    with torch.no_grad():
        for i, batch in enumerate(_batches(x, short, 0)):
            if i == 32:
                break
            pre = calibrated.pre_activations(batch).reshape(-1)
            kept = pre.sort(descending=True).values[: 4 * batch.shape[0]]
            smallest.append(float(kept[kept > 0][-1]))
        want = sum(smallest) / len(smallest)
        l0 = float((calibrated.encode(x) != 0).sum(-1).float().mean())
        l0_plain = float((plain.encode(x) != 0).sum(-1).float().mean())
    assert float(calibrated.threshold[0]) == pytest.approx(want, rel=1e-5)
    assert abs(l0 - 4.0) < 0.4, (l0, l0_plain)
    assert abs(l0 - 4.0) < abs(l0_plain - 4.0), (l0, l0_plain)


class _WritesMarker:
    """An object whose unpickling calls ``Path.touch(marker)``: what a planted file would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path):
    """A checkpoint.pt planted in the folder, whose unpickling would run code, is refused with
    FileFormatError before anything runs: the marker file never appears."""
    from mechkit.errors import FileFormatError

    marker = tmp_path / "marker"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"sae_config": _WritesMarker(str(marker))}, ckpt / "checkpoint.pt")
    torch.load(ckpt / "checkpoint.pt", weights_only=False)  # the payload does run when unpickled
    assert marker.exists()
    marker.unlink()
    with pytest.raises(FileFormatError, match=r"checkpoint\.pt"):
        train_sae(config("topk"), planted(400), TRAIN, checkpoint_dir=ckpt, stop_after_steps=1)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "json"])
def test_damaged_checkpoint_raises_file_format_error(damage, tmp_path):
    from mechkit.errors import FileFormatError

    cfg = config("topk")
    train_sae(cfg, planted(400), TRAIN, checkpoint_dir=tmp_path, stop_after_steps=4)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "random": torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
            .to(torch.uint8)
            .numpy()
            .tobytes(),
            "json": b'{"sae_config": {}}',
        }[damage]
    )
    with pytest.raises(FileFormatError, match="delete"):
        train_sae(cfg, planted(400), TRAIN, checkpoint_dir=tmp_path, stop_after_steps=1)
