"""The hand-written UCF-101 prompt table: one sentence for every class of the real classInd.txt,
none of them the class-name template's broken phrases, and a hash that follows every edit."""

import re

import pytest

from eval.datasets import class_prompt, read_class_index
from eval.ucf101_prompts import UCF101_PROMPTS, prompt_table_digest, table_prompt
from tests.conftest import SHARED

CLASS_INDEX = SHARED / "datasets" / "benchmark-splits" / "ucfTrainTestlist" / "classInd.txt"
# How a short English description of a scene starts: an article, a number or a plural subject
OPENINGS = ("a ", "an ", "two ", "people ", "horses ", "soldiers ")


def test_every_real_class_has_exactly_one_sentence():
    classes = read_class_index(CLASS_INDEX)
    assert sorted(classes) == sorted(UCF101_PROMPTS) and len(classes) == 101
    assert [table_prompt(name) for name in classes] == [UCF101_PROMPTS[name] for name in classes]
    assert table_prompt("HANDSTANDPUSHUPS") == "a person doing handstand push-ups"  # classInd spelling, case-insensitive
    with pytest.raises(KeyError, match="'Boxing' has no sentence"):
        table_prompt("Boxing")


def test_sentences_are_lower_case_english_not_class_names():
    prompts = list(UCF101_PROMPTS.values())
    assert len(set(prompts)) == 101  # no two classes share a prompt
    for name, prompt in UCF101_PROMPTS.items():
        assert prompt.startswith(OPENINGS), prompt
        assert re.fullmatch(r"[a-z][a-z ,'-]*[a-z]", prompt), prompt  # words only, no CamelCase or punctuation at the ends
        assert 2 <= len(prompt.split()) <= 10, prompt
    # The template's ungrammatical outputs the issue listed are not what the table says
    for name, broken in {"GolfSwing": "a person golf swing", "CleanAndJerk": "a person cleaning and jerk", "BabyCrawling": "a person baby crawling",
                         "BandMarching": "a person band marching", "Basketball": "a person doing basketball", "PizzaTossing": "a person pizza tossing"}.items():
        assert class_prompt(name) == broken and UCF101_PROMPTS[name] != broken


def test_the_digest_follows_every_edit():
    digest = prompt_table_digest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest) and digest == prompt_table_digest(dict(reversed(UCF101_PROMPTS.items())))
    edited = {**UCF101_PROMPTS, "YoYo": "a person playing with a yoyo"}
    assert prompt_table_digest(edited) != digest
