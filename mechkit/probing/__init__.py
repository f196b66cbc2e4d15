"""Representations: probes with controls, concept erasure, and subspace interventions.

Three questions about a site's activations, each with its standard method:

- *Is this property linearly readable here?* :func:`train_probe` fits probes at every layer
  with cross-validated regularisation and a control task (Hewitt & Liang 2019), on a
  :class:`ProbingDataset` (built in code: IOI name tokens, name gender, Python syntax roles,
  part of speech of words of Python's documentation (with spaCy's tagger, an optional extra),
  or a user's JSONL).
- *What happens if the model can no longer read it?* :func:`fit_leace` (Belrose et al. 2023)
  and :func:`fit_inlp` (Ravfogel et al. 2020) return a :class:`ConceptEraser`; :func:`erase`
  applies it inside the model; :func:`amnesic_probe` (Elazar et al. 2021) compares the LM's
  loss with the concept erased against a random subspace of the same rank.
- *Is this subspace the one the model uses?* :func:`das` (Geiger et al. 2023; boundless: Wu et
  al. 2023) learns a rotation whose interchange intervention realises a high-level causal
  model, and reports :func:`illusion_check` (Makelov et al. 2023) with every result.

Example:
    >>> data = ProbingDataset(["I met Mary"], [-1], ["female"])
    >>> data.name, len(data)
    ('custom', 1)
"""

from mechkit.probing.das import DasResult, das
from mechkit.probing.datasets import (
    FEMALE_NAMES,
    MALE_NAMES,
    POS_TAGGER,
    POS_TAGS,
    InterchangePairs,
    ProbingDataset,
    collect_activations,
    documentation_sentences,
    interchange_pairs,
    ioi_name_tokens,
    ioi_position_pairs,
    ioi_swap_pairs,
    name_gender,
    part_of_speech,
    prompts_per_forward,
    python_syntax,
)
from mechkit.probing.erasure import (
    AmnesicResult,
    ConceptEraser,
    OracleEraser,
    amnesic_probe,
    erase,
    fit_inlp,
    fit_leace,
    lm_loss,
)
from mechkit.probing.illusion import (
    IllusionReport,
    illusion_check,
    illusion_verdict,
    row_space_projector,
)
from mechkit.probing.interchange import interchange, site_activations, subspace_iia
from mechkit.probing.probes import (
    L2_GRID,
    Probe,
    ProbeResult,
    control_labels,
    fit_probe,
    train_probe,
)

__all__ = [
    "DasResult",
    "InterchangePairs",
    "interchange_pairs",
    "ioi_position_pairs",
    "ioi_swap_pairs",
    "IllusionReport",
    "das",
    "illusion_check",
    "illusion_verdict",
    "interchange",
    "row_space_projector",
    "site_activations",
    "subspace_iia",
    "AmnesicResult",
    "ConceptEraser",
    "OracleEraser",
    "amnesic_probe",
    "erase",
    "fit_inlp",
    "fit_leace",
    "lm_loss",
    "FEMALE_NAMES",
    "L2_GRID",
    "MALE_NAMES",
    "Probe",
    "ProbeResult",
    "ProbingDataset",
    "collect_activations",
    "control_labels",
    "fit_probe",
    "ioi_name_tokens",
    "name_gender",
    "prompts_per_forward",
    "python_syntax",
    "part_of_speech",
    "documentation_sentences",
    "POS_TAGGER",
    "POS_TAGS",
    "train_probe",
]
