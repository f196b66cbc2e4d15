"""The built-in datasets' labels against their sources on the real tokenizer, and LEACE against
concept-erasure on real SmolLM2 activations."""

from __future__ import annotations

import re
import tokenize

import pytest
import torch

import mechkit as mk
from mechkit.probing import collect_activations, ioi_name_tokens, name_gender, python_syntax


def test_python_syntax_labels_match_the_stdlib_tokenizer(smollm2):
    data = python_syntax(smollm2, 12)
    assert len(data) > 50
    for text, position, label, word in zip(data.texts, data.positions, data.labels,
                                           data.types, strict=True):  # fmt: skip
        piece = smollm2.tokenizer.decode([smollm2.to_tokens(text)[0, position]]).strip()
        assert piece and word.endswith(piece)  # the model token ends the Python token
        py = next(t for t in tokenize.generate_tokens(iter([text]).__next__) if t.string == word)
        expected = {tokenize.NUMBER: "number", tokenize.STRING: "string", tokenize.OP: "operator"}
        assert label == expected.get(py.type, label)


def test_ioi_name_tokens_label_exactly_the_names(smollm2):
    data = ioi_name_tokens(smollm2, 3)
    names = set(mk.probing.FEMALE_NAMES + mk.probing.MALE_NAMES)
    for word, label in zip(data.types, data.labels, strict=True):
        assert (word.strip() in names) == (label == "name")


def test_leace_on_real_activations_equals_concept_erasure(smollm2):
    from concept_erasure import LeaceFitter

    data = name_gender(smollm2)
    hook = "blocks.10.hook_resid_pre"
    x = collect_activations(smollm2, data, [hook])[hook].double()
    eraser = mk.probing.ConceptEraser.leace(x, data.label_ids)
    z = torch.nn.functional.one_hot(data.label_ids).double()
    ref = LeaceFitter.fit(x, z, shrinkage=False, constrain_cov_trace=False).eraser
    assert torch.allclose(eraser(x), ref(x), atol=1e-5)
    erased = eraser(x)
    gap = erased[data.label_ids == 0].mean(0) - erased[data.label_ids == 1].mean(0)
    assert gap.abs().max() < 1e-5


@pytest.mark.parametrize("n", [4])
def test_ioi_position_pairs_follow_the_high_level_model(smollm2, n):
    pairs = mk.probing.ioi_position_pairs(smollm2, n)
    for base, label, answer, choices in zip(pairs.base, pairs.labels, pairs.answers,
                                            pairs.choices, strict=True):  # fmt: skip
        first, second = base.split(" and ")[0].split()[-1], base.split(" and ")[1].split()[0]
        assert sorted([" " + first, " " + second]) == choices
        assert answer in choices and label in choices
        subject_clause = re.split(r"[,.] ", base)[-1]  # "C gave a ring to"
        assert answer.strip() not in subject_clause and label in choices


@pytest.mark.parametrize("swap", ["repeated", "io", "position"])
def test_ioi_swap_pairs_share_positions_and_follow_the_task(smollm2, swap):
    pairs = mk.probing.ioi_swap_pairs(smollm2, 6, swap=swap, seed=3)
    for base, source, label, answer in zip(pairs.base, pairs.source, pairs.labels,
                                           pairs.answers, strict=True):  # fmt: skip
        b, s = smollm2.to_tokens(base)[0], smollm2.to_tokens(source)[0]
        assert len(b) == len(s)
        word = lambda p, toks=b: smollm2.tokenizer.decode([toks[p]])  # noqa: E731
        io, s1, s2 = (word(pairs.positions[k]) for k in ("IO", "S1", "S2"))
        assert io == answer and s1 == s2 != io
        if swap == "repeated":  # the source repeats the IO: the answer becomes S
            assert label == s1 and word(pairs.positions["S2"], s) == io
            assert torch.equal(b[: pairs.positions["S2"]], s[: pairs.positions["S2"]])
        elif swap == "io":  # a new name in the IO slot, the rest equal
            assert word(pairs.positions["IO"], s) == label not in (io, s1)
            assert (b != s).sum() == 1
        else:  # two new names, the first repeated: the IO moves to the second slot
            first, second, again = (word(pairs.positions[k], s) for k in ("IO", "S1", "S2"))
            assert label == s1 and first == again != second
            assert not {first, second} & {io, s1}
            assert (b != s).sum() == 3
