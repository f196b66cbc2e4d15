"""Gradient methods against captum (IntegratedGradients, InputXGradient, Saliency) on a function
from input embeddings to the target through the same HookedTransformer, and IG's identities."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.input_attribution import Continuation

PROMPT = [1, 7, 3, 9, 4, 12, 5]
ANSWER = 11


def embedding_function(model, tokens, answer, kind="logprob"):
    """F(embeddings) through the model: the token embeddings replaced by the input (captum's
    input), the target read at the last position. Written here, independent of mechkit."""

    def forward(emb):
        def put(act, hook):
            return emb

        logits = model.run_with_hooks(
            tokens.expand(emb.shape[0], -1), fwd_hooks=[("hook_embed", put)]
        )
        last = logits[:, -1].float()
        if kind == "logit":
            return last[:, answer]
        return last.log_softmax(-1)[:, answer]

    return forward


def embed(model, tokens):
    with torch.no_grad():
        return model.W_E[tokens].detach()


@pytest.mark.parametrize("quadrature", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
@pytest.mark.parametrize("baseline", ["zero", "pad", 17])
def test_integrated_gradients_equals_captum(toy, quadrature, baseline):
    from captum.attr import IntegratedGradients

    tokens = torch.tensor([PROMPT])
    x = embed(toy, tokens)
    base = {"zero": torch.zeros_like(x), "pad": embed(toy, torch.zeros_like(tokens))}.get(
        baseline, embed(toy, torch.full_like(tokens, 17))
    )
    ig = IntegratedGradients(embedding_function(toy, tokens, ANSWER))
    theirs = ig.attribute(
        x, baselines=base, n_steps=16, method=quadrature, internal_batch_size=16
    ).sum(-1)[0]
    ours = mk.attribute_inputs(
        toy, tokens, ANSWER, baseline=baseline, n_steps=16, quadrature=quadrature, progress=False
    )
    assert torch.allclose(ours.scores[0], theirs.float(), atol=2e-5, rtol=1e-4)


def test_input_x_gradient_and_saliency_equal_captum(toy):
    from captum.attr import InputXGradient, Saliency

    tokens = torch.tensor([PROMPT])
    x = embed(toy, tokens)
    f = embedding_function(toy, tokens, ANSWER)
    theirs = InputXGradient(f).attribute(x.clone()).sum(-1)[0]
    ours = mk.attribute_inputs(toy, tokens, ANSWER, method="input_x_gradient", progress=False)
    assert torch.allclose(ours.scores[0], theirs, atol=1e-6)
    grad = Saliency(f).attribute(x.clone(), abs=False)[0]  # (pos, d_model)
    for norm, p in (("l2", 2), ("l1", 1)):
        sal = mk.attribute_inputs(toy, tokens, ANSWER, method="saliency", norm=norm, progress=False)
        assert torch.allclose(sal.scores[0], grad.norm(p=p, dim=-1), atol=1e-6)


def test_completeness_and_batching(toy):
    # exact identity: sum IG = F(x) - F(baseline), at enough Gauss-Legendre nodes
    r = mk.attribute_inputs(
        toy, [PROMPT, PROMPT[:4]], ANSWER, baseline="zero", n_steps=48, progress=False
    )
    direct = r.target_values - r.extras["baseline_value"]
    assert torch.allclose(r.scores.nansum(-1), direct, atol=1e-4)
    assert float(r.completeness_gap.abs().max()) < 1e-4
    assert torch.allclose(r.extras["target_value"], r.target_values, atol=1e-5)
    # the points of the path in batches of 3 give the same attributions
    small = mk.attribute_inputs(
        toy, [PROMPT, PROMPT[:4]], ANSWER, baseline="zero", n_steps=48, batch_size=3, progress=False
    )
    assert torch.allclose(small.scores, r.scores, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("baseline", ["pad", "mean"])
def test_adaptive_rule_meets_its_tolerance_and_equals_captum(toy, baseline):
    # the adaptive rule refines until |gap| <= tolerance * |F(x) - F(x')|; its attributions
    # converge to captum's at many Gauss-Legendre points (an independent quadrature)
    from captum.attr import IntegratedGradients

    tokens = torch.tensor([PROMPT])
    x = embed(toy, tokens)
    base = embed(toy, torch.zeros_like(tokens)) if baseline == "pad" else x * 0 + toy.W_E.mean(0)
    theirs = IntegratedGradients(embedding_function(toy, tokens, ANSWER)).attribute(
        x, baselines=base.detach(), n_steps=200, method="gausslegendre", internal_batch_size=200
    ).sum(-1)[0]  # fmt: skip
    coarse = mk.attribute_inputs(
        toy, tokens, ANSWER, baseline=baseline, n_steps=4, tolerance=0.5, progress=False
    )
    fine = mk.attribute_inputs(
        toy, tokens, ANSWER, baseline=baseline, n_steps=4, tolerance=1e-5, progress=False
    )
    delta = fine.target_values - fine.extras["baseline_value"]
    assert float((fine.completeness_gap / delta).abs().max()) <= 1e-5 + 1e-6
    assert fine.extras["n_points"][0] > coarse.extras["n_points"][0] == 4  # it refined
    assert torch.allclose(fine.scores[0], theirs.float(), atol=1e-4)
    # the gap reported is the quadrature's: the coarse result is further from captum's
    assert (coarse.scores[0] - theirs).abs().max() > (fine.scores[0] - theirs).abs().max()


def test_adaptive_rule_stops_at_max_steps(toy):
    r = mk.attribute_inputs(
        toy, [PROMPT], ANSWER, n_steps=4, tolerance=0.0, max_steps=12, progress=False
    )
    assert int(r.extras["n_points"][0]) <= 12
    with pytest.raises(mk.InvalidArgumentError, match="tolerance"):
        mk.attribute_inputs(toy, [PROMPT], ANSWER, tolerance=-1.0, progress=False)
    with pytest.raises(mk.InvalidArgumentError, match="max_steps"):
        mk.attribute_inputs(toy, [PROMPT], ANSWER, method="saliency", max_steps=8, progress=False)


def test_bos_is_kept_out_and_its_embedding_fixed(toy):
    r = mk.attribute_inputs(
        toy, [[0, *PROMPT]], ANSWER, baseline="zero", n_steps=48, progress=False
    )
    assert r.scores[0, 0] == 0 and not r.attributed[0, 0]
    assert float(r.completeness_gap.abs().max()) < 1e-4


def test_logit_difference_target_is_linear(toy):
    # IG is linear in the target: IG(logit a - logit b) = IG(logit a) - IG(logit b)
    pairs = mk.PromptPairs.from_tokens([PROMPT], [PROMPT], answers=[ANSWER], wrongs=[4])
    diff = mk.attribute_inputs(
        toy, pairs, baseline="zero", n_steps=8, quadrature="gausslegendre", progress=False
    )
    ig = dict(kind="logit", baseline="zero", n_steps=8, quadrature="gausslegendre")
    a = mk.attribute_inputs(toy, [PROMPT], ANSWER, **ig, progress=False)
    b = mk.attribute_inputs(toy, [PROMPT], 4, **ig, progress=False)
    assert torch.allclose(diff.scores, a.scores - b.scores, atol=1e-5)
    # and a plain function of the logits gives the same
    fn = mk.attribute_inputs(
        toy,
        [PROMPT],
        lambda lg: lg[:, -1, ANSWER] - lg[:, -1, 4],
        baseline="zero",
        n_steps=8,
        quadrature="gausslegendre",
        progress=False,
    )
    assert torch.allclose(fn.scores, diff.scores, atol=1e-6)


def test_corrupt_prompt_baseline(toy):
    corrupt = [1, 7, 8, 9, 4, 12, 5]
    pairs = mk.PromptPairs.from_tokens([PROMPT], [corrupt], answers=[ANSWER], wrongs=[4])
    r = mk.attribute_inputs(toy, pairs, baseline="corrupt", n_steps=64, progress=False)
    # only position 2 differs, so only it can get attribution, and it gets all of it
    assert torch.count_nonzero(r.scores[0]) == 1
    assert float(r.completeness_gap.abs().max()) < 1e-4


def test_continuation_steps_add_up(toy):
    r = mk.attribute_inputs(
        toy, [PROMPT], Continuation([11, 12, 13]), baseline="zero", n_steps=48, progress=False
    )
    assert r.step_scores.shape == (1, 3, len(PROMPT))
    assert torch.allclose(r.step_scores.sum(1), r.scores, atol=1e-5)
    delta = r.target_values - r.extras["baseline_value"]
    assert float((r.completeness_gap / delta).abs().max()) < 0.01
    # the step-0 target is the next-token target of the prompt itself
    first = mk.attribute_inputs(toy, [PROMPT], 11, baseline="zero", n_steps=48, progress=False)
    assert torch.allclose(r.step_scores[0, 0], first.scores[0], atol=1e-5)
    # greedy continuation: the generated tokens are the model's own argmax
    g = mk.attribute_inputs(
        toy, [PROMPT], Continuation(n_tokens=2), method="saliency", progress=False
    )
    tokens = torch.tensor([PROMPT])
    first_token = int(toy(tokens)[0, -1].argmax())
    assert g.step_labels[0][0] == str(first_token)


def test_smollm2_completeness_and_captum(smollm2):
    from captum.attr import IntegratedGradients

    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and"
    )
    # the first 14 tokens ("... on the Champ"): the default baseline and rule (pad, adaptive)
    # at a 10% tolerance, to keep the test cheap (210 points, 3.2% measured, 36 CPU s; the first
    # 30 tokens: 172 points in 57 s; the benchmark measures the default 1% on those 30)
    tokens = smollm2.to_tokens(text, prepend_bos=False)[:, :14]
    r = mk.attribute_inputs(smollm2, tokens, tolerance=0.1, progress=False)
    delta = r.extras["target_value"] - r.extras["baseline_value"]
    assert float((r.completeness_gap / delta).abs().max()) <= 0.1 + 1e-4
    assert 32 < int(r.extras["n_points"][0]) <= 1024  # refined beyond its first 32 points
    # agreement with captum on the same embeddings at 6 points
    answer = int(smollm2(tokens)[0, -1].argmax())
    x = embed(smollm2, tokens)
    pad = smollm2.tokenizer.pad_token_id
    base = embed(smollm2, torch.full_like(tokens, pad))
    theirs = IntegratedGradients(embedding_function(smollm2, tokens, answer)).attribute(
        x, baselines=base, n_steps=6, method="gausslegendre", internal_batch_size=6
    ).sum(-1)[0]  # fmt: skip
    ours = mk.attribute_inputs(
        smollm2, tokens, answer, n_steps=6, quadrature="gausslegendre", progress=False
    )
    assert float((ours.scores[0] - theirs).abs().max()) < 1e-3 * float(theirs.abs().max())
