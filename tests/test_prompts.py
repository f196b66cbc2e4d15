"""PromptPairs: tokenization, right padding that leaves real-token outputs unchanged, JSONL, and
the errors for bad datasets."""

from __future__ import annotations

import json

import pytest
import torch

import mechkit as mk

CLEAN = [
    "When Mary and John went to the store, John gave a drink to",
    "Then, Anna and Tom had a long and really fun day at the beach. Tom gave a ball to",
    "The capital of France is",
]
CORRUPT = [
    "When Alice and Bob went to the store, Carl gave a drink to",
    "Then, Sarah and Mike had a long and really fun day at the beach. Paul gave a ball to",
    "The capital of Brazil is",
]
ANSWERS = [" Mary", " Anna", " Paris"]
WRONGS = [" John", " Tom", " Bras"]


@pytest.fixture(scope="module")
def pairs(smollm2):
    return mk.PromptPairs.from_lists(smollm2, CLEAN, CORRUPT, ANSWERS, WRONGS)


def test_tokens_answers_and_positions(smollm2, pairs):
    tok = smollm2.tokenizer
    assert len(pairs) == 3 and pairs.is_aligned and pairs.is_padded
    for i, text in enumerate(CLEAN):
        ids = tok.encode(text, add_special_tokens=False)
        assert pairs.clean_tokens[i, : len(ids)].tolist() == ids
        assert int(pairs.answer_positions()[i]) == len(ids) - 1
        assert not pairs.clean_mask[i, len(ids) :].any()
    assert [tok.decode([int(t)]) for t in pairs.answer] == ANSWERS


@torch.no_grad()
def test_padding_leaves_each_prompts_answer_logits_unchanged(smollm2, pairs):
    batched = smollm2(pairs.clean_tokens)  # one padded batch
    positions = pairs.answer_positions()
    for i, text in enumerate(CLEAN):
        alone = smollm2(smollm2.to_tokens(text))[0, -1]  # unpadded, one prompt
        assert (batched[i, positions[i]] - alone).abs().max() < 1e-4
    metric = mk.LogitDiff.from_pairs(pairs)
    single = [
        mk.metrics.logit_diff(
            smollm2(smollm2.to_tokens(t)), pairs.answer[i : i + 1], pairs.wrong[i : i + 1]
        )
        for i, t in enumerate(CLEAN)
    ]
    assert torch.allclose(metric.per_prompt(batched), torch.cat(single), atol=1e-4)
    assert metric.per_prompt(batched)[0] > 2  # SmolLM2 prefers Mary over John here


def test_misaligned_pair_is_refused_with_the_pair_named(smollm2):
    with pytest.raises(mk.PromptLengthError) as err:
        mk.PromptPairs.from_lists(
            smollm2,
            [CLEAN[0], "The capital of France is"],
            [CORRUPT[0], "The capital of the United Kingdom is"],
            [" Mary", " Paris"],
            [" John", " London"],
        )
    message = str(err.value)
    n_clean = len(smollm2.tokenizer.encode("The capital of France is", add_special_tokens=False))
    n_corrupt = len(
        smollm2.tokenizer.encode("The capital of the United Kingdom is", add_special_tokens=False)
    )
    assert "pair 1" in message and "aligned=False" in message
    assert f"{n_clean} clean vs {n_corrupt} corrupt" in message
    pairs = mk.PromptPairs.from_lists(
        smollm2,
        ["The capital of France is"],
        ["The capital of the United Kingdom is"],
        [" Paris"],
        [" London"],
        aligned=False,
    )
    assert not pairs.is_aligned
    assert pairs.answer_positions("corrupt").tolist() == [n_corrupt - 1]


def test_multi_token_answer(smollm2):
    with pytest.raises(mk.MultiTokenAnswerError, match="tokenizes to 5 tokens"):
        mk.PromptPairs.from_lists(smollm2, CLEAN[:1], CORRUPT[:1], [" Maryanne-Louise"], [" John"])


def test_empty_dataset(smollm2, tmp_path):
    with pytest.raises(mk.EmptyDatasetError):
        mk.PromptPairs.from_lists(smollm2, [], [], [], [])
    with pytest.raises(mk.EmptyDatasetError):
        mk.PromptPairs.from_tokens([], [], [], [])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(mk.EmptyDatasetError, match="empty.jsonl"):
        mk.PromptPairs.from_jsonl(smollm2, empty)


def test_jsonl_round_trip(smollm2, pairs, tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"clean": c, "corrupt": x, "answer": a, "wrong": w})
        for c, x, a, w in zip(CLEAN, CORRUPT, ANSWERS, WRONGS, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n\n")
    loaded = mk.PromptPairs.from_jsonl(smollm2, path)
    assert torch.equal(loaded.clean_tokens, pairs.clean_tokens)
    assert torch.equal(loaded.corrupt_tokens, pairs.corrupt_tokens)
    assert torch.equal(loaded.answer, pairs.answer) and torch.equal(loaded.wrong, pairs.wrong)


@pytest.mark.parametrize(
    ("line", "text"),
    [
        ('{"clean": "a", "corrupt": "b", "answer": " x"', "line is not valid JSON"),
        ('{"clean": "a", "corrupt": "b", "answer": " x"}', "missing ['wrong']"),
        ('["a", "b"]', "got a list"),
        ('{"clean": "a", "corrupt": "b", "answer": " x", "wrong": 3}', "string for 'wrong'"),
    ],
)
def test_jsonl_errors_name_the_line(smollm2, tmp_path, line, text):
    good = json.dumps({"clean": "a b", "corrupt": "c d", "answer": " x", "wrong": " y"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(mk.DatasetFormatError) as err:
        mk.PromptPairs.from_jsonl(smollm2, path)
    assert "bad.jsonl:3:" in str(err.value) and text in str(err.value)


def test_slicing_trims_padding(pairs):
    first = pairs[0]
    assert len(first) == 1 and first.clean_tokens.shape[1] == int(pairs.clean_lengths[0])
    assert first.clean_texts == (CLEAN[0],)
    two = pairs[[2, 0]]
    assert two.answer.tolist() == [int(pairs.answer[2]), int(pairs.answer[0])]
    assert "clean" in pairs.to_dataframe().columns


def test_from_tokens_for_models_without_tokenizer(toy):
    pairs = mk.PromptPairs.from_tokens(
        [[0, 5, 6, 7], [0, 8, 9]], [[0, 1, 2, 3], [0, 4, 4]], [5, 8], [1, 4]
    )
    assert pairs.clean_tokens.tolist() == [[0, 5, 6, 7], [0, 8, 9, 0]]
    assert pairs.answer_positions().tolist() == [3, 2]
    with pytest.raises(mk.ShapeError, match="with a tokenizer"):
        mk.PromptPairs.from_lists(toy, ["a"], ["b"], ["c"], ["d"])
    with pytest.raises(mk.ShapeError, match="as many"):
        mk.PromptPairs.from_tokens([[1, 2]], [[1, 2]], [1, 2], [3])


GOOD_LINE = json.dumps({"clean": "a b", "corrupt": "c d", "answer": " x", "wrong": " y"})


@pytest.mark.parametrize(
    ("encoding", "text"),
    [("utf-16", "looks like UTF-16"), ("latin-1", "is not UTF-8")],
)
def test_jsonl_in_utf16_or_latin1_raises_dataset_format_error(toy, tmp_path, encoding, text):
    path = tmp_path / "pairs.jsonl"
    fields = {"clean": "café", "corrupt": "thé", "answer": " x", "wrong": " y"}
    line = json.dumps(fields, ensure_ascii=False)
    path.write_bytes(f"{GOOD_LINE}\n{line}\n".encode(encoding, errors="strict"))
    with pytest.raises(mk.DatasetFormatError) as err:
        mk.PromptPairs.from_jsonl(toy, path)
    message = str(err.value)
    assert "pairs.jsonl:" in message and text in message and "save the file as UTF-8" in message
    if encoding == "latin-1":  # the first line is ASCII: the bad byte is on line 2
        assert "pairs.jsonl:2:" in message


def test_jsonl_with_a_lone_surrogate_raises_dataset_format_error(toy, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_LINE + '\n{"clean": "a \\ud800", "corrupt": "b", "answer": " x", '
                    '"wrong": " y"}\n')  # fmt: skip
    with pytest.raises(mk.DatasetFormatError, match=r"pairs.jsonl:2: .*lone surrogate"):
        mk.PromptPairs.from_jsonl(toy, path)


def test_jsonl_nested_too_deeply_raises_dataset_format_error(toy, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(GOOD_LINE + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(mk.DatasetFormatError, match=r"pairs.jsonl:2: .*nested too deeply"):
        mk.PromptPairs.from_jsonl(toy, path)


def test_jsonl_directory_is_reported_as_a_directory(toy, tmp_path):
    with pytest.raises(mk.DatasetFormatError, match="is a directory"):
        mk.PromptPairs.from_jsonl(toy, tmp_path)
    with pytest.raises(mk.DatasetFormatError, match="does not exist"):
        mk.PromptPairs.from_jsonl(toy, tmp_path / "missing.jsonl")


def test_jsonl_utf8_with_byte_order_mark_is_read(smollm2, pairs, tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [
        json.dumps({"clean": c, "corrupt": x, "answer": a, "wrong": w})
        for c, x, a, w in zip(CLEAN, CORRUPT, ANSWERS, WRONGS, strict=True)
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8-sig"))
    loaded = mk.PromptPairs.from_jsonl(smollm2, path)
    assert torch.equal(loaded.clean_tokens, pairs.clean_tokens)
    assert torch.equal(loaded.answer, pairs.answer)


def test_jsonl_prompt_longer_than_the_context_raises_context_length_error(smollm2, tmp_path):
    n_ctx = smollm2.cfg.n_ctx
    long = " the" * (n_ctx + 10)
    path = tmp_path / "long.jsonl"
    path.write_text(
        json.dumps({"clean": long, "corrupt": long, "answer": " x", "wrong": " y"}) + "\n"
    )
    with pytest.raises(mk.ContextLengthError, match=rf"at most n_ctx={n_ctx} tokens"):
        mk.PromptPairs.from_jsonl(smollm2, path)
    with pytest.raises(mk.ContextLengthError):
        mk.PromptPairs.from_lists(smollm2, [long], [long], [" x"], [" y"])
