"""An SAE latent's steering vector equals adding to that latent inside the spliced model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mechkit as mk
from mechkit.errors import InvalidSiteError, MechkitError
from mechkit.sae import SAEConfig, SparseDictionary

TRAINED = Path(mk.__file__).parent / "sae" / "trained"


@pytest.mark.parametrize("name", ["smollm2-135m-res12-topk", "smollm2-135m-mlp12-skip-transcoder"])
def test_steering_with_a_latent_equals_adding_to_it_in_the_splice(smollm2, name):
    sae = mk.load_sae(TRAINED / name)
    tokens = smollm2.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    vec = mk.steering.sae_latent_vector(sae, [7, 300], weights=[1.0, -0.5])
    assert vec.hook_name == "blocks.12.hook_resid_post" and vec.vector.shape == (576,)
    with torch.no_grad():
        with mk.steer(smollm2, vec, coefficient=6.0):
            steered = smollm2(tokens)
        with mk.splice(smollm2, sae) as spliced:
            spliced.add([7], 6.0)
            spliced.add([300], -3.0)
            edited = smollm2(tokens)
        plain = smollm2(tokens)
    assert (steered - plain).abs().max() > 0.1
    torch.testing.assert_close(steered, edited, atol=2e-3, rtol=1e-4)


def test_bad_latents_and_sites_are_refused():
    z = SparseDictionary.from_config(
        SAEConfig(architecture="relu", d_in=64, d_sae=8, hook_name="blocks.0.attn.hook_z")
    )
    with pytest.raises(InvalidSiteError, match="residual stream"):
        mk.steering.sae_latent_vector(z, 1)
    resid = SparseDictionary.from_config(
        SAEConfig(architecture="relu", d_in=64, d_sae=8, hook_name="blocks.3.hook_resid_pre")
    )
    with pytest.raises(InvalidSiteError, match=r"\[0, 8\)"):
        mk.steering.sae_latent_vector(resid, 9)
    with pytest.raises(MechkitError, match="one weight per latent"):
        mk.steering.sae_latent_vector(resid, [1, 2], weights=[1.0])
    vec = mk.steering.sae_latent_vector(resid, 2)
    assert vec.site == "resid_pre" and vec.layer == 3
    torch.testing.assert_close(vec.vector, resid.W_dec[2].float())
