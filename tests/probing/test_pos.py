"""The part-of-speech dataset: words of Python's documentation tagged by spaCy's English model
(an optional dependency: the tagged tests are skipped without it)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

import mechkit as mk
from mechkit.probing import POS_TAGGER, POS_TAGS, datasets, documentation_sentences, part_of_speech

# words with one part of speech in any English sentence: a check of the labels that does not
# come from the tagger
UNAMBIGUOUS = {"the": "DET", "an": "DET", "of": "ADP", "with": "ADP", "from": "ADP",
               "into": "ADP", "we": "PRON", "it": "PRON"}  # fmt: skip


def test_without_spacy_the_error_gives_the_install_command(toy, monkeypatch):
    monkeypatch.setattr(datasets, "_TAGGERS", {})
    monkeypatch.setitem(sys.modules, POS_TAGGER, None)  # importing it raises ImportError
    with pytest.raises(mk.MissingDependencyError, match=r"pip install 'mechkit\[pos\]'"):
        part_of_speech(toy, 4)


def test_documentation_sentences_are_prose_on_one_line():
    sentences = documentation_sentences()
    assert len(sentences) > 1000
    for s in sentences:
        assert "\n" not in s and ">>>" not in s and 30 <= len(s) <= 200 and s[0].isupper()


@pytest.mark.skipif(
    importlib.util.find_spec(POS_TAGGER) is None,
    reason=f"{POS_TAGGER} (spaCy's English model) not installed: pip install 'mechkit[pos]'",
)
def test_part_of_speech_labels_follow_the_words(smollm2):
    data = part_of_speech(smollm2, 30)
    assert set(data.classes) == set(POS_TAGS)
    checked = 0
    for text, position, label, word in zip(data.texts, data.positions, data.labels,
                                           data.types, strict=True):  # fmt: skip
        piece = smollm2.tokenizer.decode([smollm2.to_tokens(text)[0, position]]).strip()
        assert piece and word.endswith(piece.lower())  # the model token ends the word
        assert word in text.lower()
        if word in UNAMBIGUOUS:
            assert label == UNAMBIGUOUS[word], (word, text)
            checked += 1
    assert checked > 20
