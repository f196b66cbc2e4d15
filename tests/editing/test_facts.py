"""The built-in facts, the loader, and tokenized facts."""

from __future__ import annotations

import json

import pytest

import mechkit as mk
from mechkit.editing import Fact, builtin_facts, load_facts


def test_builtin_facts_are_well_formed():
    facts = builtin_facts()
    assert len(facts) == len(mk.editing.BUILTIN_FACTS) == 120
    for f in facts:
        assert f.target.startswith(" ") and f.new_target and f.new_target != f.target
        assert f.subject in f.text and len(f.paraphrases) == 2
        assert all(f.subject not in p for p, _ in f.neighbours) and f.neighbours
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'capital'"):
        builtin_facts(["capitol"])


def test_load_counterfact_and_flat_records(tmp_path):
    counterfact = {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is", "relation_id": "P103",
            "target_new": {"str": "English"}, "target_true": {"str": "French"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["Danielle Darrieux speaks"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    }  # fmt: skip
    flat = {
        "subject": "France", "prompt": "The capital of {} is", "target": "Paris",
        "new_target": " Rome", "neighbours": [["The capital of Spain is", "Madrid"]],
    }  # fmt: skip
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps(counterfact) + "\n\n" + json.dumps(flat) + "\n")
    a, b = load_facts(path)
    assert (a.subject, a.target, a.new_target, a.relation) == (
        "Danielle Darrieux", " French", " English", "P103")  # fmt: skip
    assert a.neighbours == (("The mother tongue of Léon Blum is", " French"),)
    assert b == Fact("France", "The capital of {} is", " Paris", " Rome",
                     neighbours=(("The capital of Spain is", " Madrid"),))  # fmt: skip
    as_list = tmp_path / "counterfact.json"
    as_list.write_text(json.dumps([counterfact]))
    assert load_facts(as_list) == [a]


def test_loader_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"subject": "France", "prompt": "The capital of {} is", "target": "P"}\n'
                    '{"subject": "France"}\n')  # fmt: skip
    with pytest.raises(mk.DatasetFormatError, match=r"bad.jsonl:2"):
        load_facts(path)
    path.write_text('{"subject": "France", "prompt": "The capital of France is", "target": "P"}')
    with pytest.raises(mk.DatasetFormatError, match=r"one '\{\}'"):
        load_facts(path)
    path.write_text("\n")
    with pytest.raises(mk.EmptyDatasetError):
        load_facts(path)
