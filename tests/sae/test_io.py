"""sae-lens's on-disk format both ways: sae-lens loads what we save and gives our outputs; we
load what sae-lens saves (random weights, each architecture) and give its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sae_lens
import torch

import mechkit as mk
from mechkit.errors import FileFormatError, MechkitError
from mechkit.sae import SAEConfig, load_sae, save_sae
from mechkit.sae.io import SAEFileError
from tests.conftest import DAMAGES, JSON_DAMAGES, damage
from tests.sae.test_architectures import D_IN, D_OUT, D_SAE, make

torch.set_num_threads(1)

# (mechkit architecture, kind) -> the sae-lens class that must read the file
SAE_LENS_CLASS = {
    ("relu", "sae"): sae_lens.StandardSAE,
    ("topk", "sae"): sae_lens.TopKSAE,
    ("batchtopk", "sae"): sae_lens.JumpReLUSAE,
    ("jumprelu", "sae"): sae_lens.JumpReLUSAE,
    ("relu", "transcoder"): sae_lens.Transcoder,
    ("relu", "skip"): sae_lens.SkipTranscoder,
    ("jumprelu", "transcoder"): sae_lens.JumpReLUTranscoder,
    ("jumprelu", "skip"): sae_lens.JumpReLUSkipTranscoder,
    ("batchtopk", "transcoder"): sae_lens.JumpReLUTranscoder,
    ("batchtopk", "skip"): sae_lens.JumpReLUSkipTranscoder,
}


@pytest.mark.parametrize(("arch", "kind"), sorted(SAE_LENS_CLASS))
def test_sae_lens_loads_ours_with_the_same_outputs(arch, kind, tmp_path):
    ours = make(arch, kind)
    save_sae(ours, tmp_path / "sae")
    loader = sae_lens.SAE if kind == "sae" else SAE_LENS_CLASS[(arch, kind)]
    theirs = loader.load_from_disk(str(tmp_path / "sae"))
    assert type(theirs) is SAE_LENS_CLASS[(arch, kind)]
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == ours.cfg.hook_name
    # ... and we read it back exactly, class included
    again = load_sae(tmp_path / "sae")
    assert type(again) is type(ours) and again.cfg == ours.cfg
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_topk_transcoder_with_equal_widths_is_a_topk_sae_for_sae_lens(tmp_path):
    cfg = make("topk", "sae").cfg.replace(
        d_out=D_IN, out_hook_name="blocks.0.hook_mlp_out", hook_name="blocks.0.ln2.hook_normalized"
    )
    ours = make("topk", "sae").__class__(cfg)
    ours.load_state_dict(make("topk", "sae").state_dict())
    save_sae(ours, tmp_path / "tc")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"))
    assert type(theirs) is sae_lens.TopKSAE and theirs.cfg.apply_b_dec_to_input is False
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
    assert load_sae(tmp_path / "tc").cfg == cfg


def test_topk_transcoders_sae_lens_cannot_hold_still_round_trip_through_mechkit(tmp_path):
    ours = make("topk", "skip")
    save_sae(ours, tmp_path / "tc")
    raw = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert raw["architecture"] == "mechkit_topk_skip_transcoder"
    again = load_sae(tmp_path / "tc")
    x = torch.randn(5, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x))


def random_sae_lens(cls, cfg_cls, *, seed=0, **kw):
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    cfg.metadata.model_name = "toy"
    sae = cls(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b_") else 1.0))
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
    return sae


THEIRS = [
    ("standard", sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
    ("topk", sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 5}),
    (
        "topk-rescaled",
        sae_lens.TopKSAE,
        sae_lens.TopKSAEConfig,
        {"k": 5, "rescale_acts_by_decoder_norm": True},
    ),
    ("jumprelu", sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    ("transcoder", sae_lens.Transcoder, sae_lens.TranscoderConfig, {"d_out": D_OUT}),
    ("skip", sae_lens.SkipTranscoder, sae_lens.SkipTranscoderConfig, {"d_out": D_OUT}),
    (
        "jumprelu_transcoder",
        sae_lens.JumpReLUTranscoder,
        sae_lens.JumpReLUTranscoderConfig,
        {"d_out": D_OUT},
    ),
    (
        "jumprelu_skip",
        sae_lens.JumpReLUSkipTranscoder,
        sae_lens.JumpReLUSkipTranscoderConfig,
        {"d_out": D_OUT},
    ),
]


@pytest.mark.parametrize(("label", "cls", "cfg_cls", "kw"), THEIRS, ids=[t[0] for t in THEIRS])
def test_we_load_sae_lens_files_with_the_same_outputs(label, cls, cfg_cls, kw, tmp_path):
    if "d_out" in kw:
        kw = {**kw, "apply_b_dec_to_input": False}
    theirs = random_sae_lens(cls, cfg_cls, **kw)
    theirs.save_model(str(tmp_path / label))
    ours = load_sae(tmp_path / label)
    assert ours.cfg.hook_name == "blocks.1.hook_resid_post" and ours.cfg.model_name == "toy"
    assert ours.is_transcoder == ("d_out" in kw)
    x = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = theirs.encode(x)
        assert (f != 0).any() and (f == 0).any()
        torch.testing.assert_close(ours.encode(x), f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.decode(f), theirs.decode(f), atol=1e-5, rtol=1e-5)


def test_weights_can_be_stored_in_bfloat16_and_load_back_as_float32(tmp_path):
    ours = make("topk", "sae")
    save_sae(ours, tmp_path / "full")
    save_sae(ours, tmp_path / "half", weights_dtype="bfloat16")
    full = (tmp_path / "full" / "sae_weights.safetensors").stat().st_size
    half = (tmp_path / "half" / "sae_weights.safetensors").stat().st_size
    assert half < 0.6 * full
    again = load_sae(tmp_path / "half")
    assert again.W_enc.dtype == torch.float32
    assert torch.equal(again.W_dec, ours.W_dec.detach().bfloat16().float())
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "half"))
    assert theirs.W_dec.dtype == torch.float32


def test_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(MechkitError, match="cfg.json and sae_weights.safetensors"):
        load_sae(tmp_path / "nothing")
    ours = make("relu", "sae")
    save_sae(ours, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "cfg.json").read_text())
    raw["metadata"]["mechkit"]["d_sae"] = D_SAE + 1
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(MechkitError, match="wrong shapes"):
        load_sae(tmp_path / "a")
    raw = {"architecture": "jumprelu_transcodr", "d_in": 4, "d_sae": 8, "metadata": {}}
    save_sae(ours, tmp_path / "b")
    (tmp_path / "b" / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="Did you mean 'jumprelu_transcoder'"):
        load_sae(tmp_path / "b")
    with pytest.raises(MechkitError, match="SparseDictionary"):
        save_sae(torch.nn.Linear(2, 2), tmp_path / "c")


def test_config_of_sae_lens_file_without_hook_needs_one(tmp_path):
    cfg = sae_lens.StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)
    sae_lens.StandardSAE(cfg).save_model(str(tmp_path / "s"))
    with pytest.raises(MechkitError, match="hook_name"):
        load_sae(tmp_path / "s")
    assert load_sae(tmp_path / "s", hook_name="blocks.0.hook_resid_pre").cfg == SAEConfig(
        architecture="relu", d_in=D_IN, d_sae=D_SAE, hook_name="blocks.0.hook_resid_pre"
    )


def test_load_sae_takes_a_shipped_dictionary_by_name():
    from mechkit.sae.io import shipped_saes

    shipped = shipped_saes()
    folder = Path(mk.__file__).parent / "sae" / "trained" / "smollm2-135m-res12-topk"
    assert shipped["smollm2-135m-res12-topk"].resolve() == folder.resolve()
    assert len(shipped) == 5
    by_name, by_path = mk.load_sae("smollm2-135m-res12-topk"), mk.load_sae(folder)
    assert by_name.cfg == by_path.cfg
    assert all(
        (a == b).all()
        for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values(), strict=True)
    )
    with pytest.raises(mk.MechkitError, match="Did you mean 'smollm2-135m-res12-topk'"):
        mk.load_sae("smollm2-135m-res12-topkk")


@pytest.mark.parametrize("how", JSON_DAMAGES)
def test_damaged_sae_config_raises_file_format_error(how, tmp_path):
    save_sae(make("topk", "sae"), tmp_path / "s")
    damage(tmp_path / "s" / "cfg.json", how)
    with pytest.raises(FileFormatError, match="cfg.json") as err:
        load_sae(tmp_path / "s")
    assert "Hint" in str(err.value)
    assert isinstance(err.value, SAEFileError)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_sae_weights_raise_file_format_error(how, tmp_path):
    save_sae(make("topk", "sae"), tmp_path / "s")
    damage(tmp_path / "s" / "sae_weights.safetensors", how)
    with pytest.raises(FileFormatError, match="sae_weights.safetensors") as err:
        load_sae(tmp_path / "s")
    assert "Hint" in str(err.value)


def test_sae_config_with_wrong_field_types_names_the_file(tmp_path):
    save_sae(make("topk", "sae"), tmp_path / "s")
    raw = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del raw["metadata"]["mechkit"]
    raw["d_in"] = "wide"
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(raw))
    with pytest.raises(FileFormatError, match="cfg.json"):
        load_sae(tmp_path / "s")
