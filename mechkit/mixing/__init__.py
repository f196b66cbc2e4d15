"""Context mixing: how much each token's representation is made of every other token, layer by
layer (issue 20).

Attention weights alone mislead about which tokens a representation draws on (Jain & Wallace
2019; Serrano & Smith 2019; Bastings & Filippova 2020). The methods here follow more of the
block: rollout and flow over the layers (Abnar & Zuidema 2020), the norms of the weighted value
vectors with the residual and the normalization folded in (Kobayashi et al. 2020, 2021), GlobEnc
(Modarressi et al. 2022), ALTI and ALTI-Logit (Ferrando et al. 2022, 2023), value zeroing
(Mohebbi et al. 2023) and DecompX through the MLPs (Modarressi et al. 2023). Each is one module
that registers itself under its name; :func:`context_mixing` runs any of them and returns a
:class:`ContextMixing`. All are exact on Llama-type models (rotary, RMSNorm, grouped-query
attention, gated MLPs); :mod:`mechkit.mixing.blocks` states why.

Example:
    >>> model = mk.load_model("attn-only-2l")
    >>> mix = mk.context_mixing(model, torch.tensor([[1, 2, 3]]), method="attention")
    >>> mix.method, mix.aggregated.shape            # (batch, query, key)
    ('attention', torch.Size([1, 3, 3]))
"""

# Importing a method's module registers it; the order here is the order of METHODS.
# isort: off
from mechkit.mixing import attention, norms, alti, value_zeroing, decompx  # noqa: F401

# isort: on
from mechkit.mixing.agreement import MixingAgreement, mixing_agreement
from mechkit.mixing.api import context_mixing
from mechkit.mixing.demo import demo_section
from mechkit.mixing.registry import METHODS
from mechkit.mixing.result import ContextMixing

__all__ = [
    "context_mixing",
    "ContextMixing",
    "mixing_agreement",
    "MixingAgreement",
    "METHODS",
    "demo_section",
]
