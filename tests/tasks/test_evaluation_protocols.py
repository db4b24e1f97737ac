"""The reference protocols built on the real UCF-101 lists and the real MSR-VTT 1k-A file
(../shared/datasets/benchmark-splits/, read in place): counts, the seeded shuffle, labels drawn
from the lists' own distribution, prompts from the table, and every deviation recorded."""

import math
from collections import Counter

import pytest

from eval.ucf101_prompts import UCF101_PROMPTS, prompt_table_digest
from tasks.config.params import EvaluateParams, ParamsError, Params
from tasks.evaluation.protocols import RESERVE_SHARE, build_protocols
from tests.conftest import SHARED

SPLITS = SHARED / "datasets" / "benchmark-splits"


def params(**evaluate) -> Params:
    settings = {"ucf101_lists": str(SPLITS / "ucfTrainTestlist"), "ucf101_videos": "/data/UCF-101", **evaluate}
    return Params(evaluate=EvaluateParams(**settings))


def test_stylegan_v_on_the_real_testlist01():
    (protocol,) = build_protocols(params(protocols="stylegan-v"))
    assert protocol.split == "testlist01" and protocol.deviations == [] and protocol.real_limit == 2048
    assert len(protocol.prompts) == 2048 and len(protocol.real) == 2048 + math.ceil(2048 * RESERVE_SHARE)  # reserves for discarded videos
    assert protocol.real["path"].str.startswith("/data/UCF-101/").all() and protocol.real["id"].is_unique
    assert (protocol.view.frames, protocol.view.height, protocol.view.width, protocol.view.real_read) == (16, 256, 256, "window")
    assert set(protocol.prompts) <= set(UCF101_PROMPTS.values()) and protocol.details["prompt_table_sha256"] == prompt_table_digest()
    # Generated labels follow the list's label distribution (StyleGAN-V draws dataset labels), not classes in turn
    counts = Counter(protocol.prompts)
    assert len(counts) > 90 and max(counts.values()) > 2 * min(counts.values())
    # Seeded: the same protocol twice; another seed shuffles the real set differently
    again, = build_protocols(params(protocols="stylegan-v"))
    assert again.prompts == protocol.prompts and again.real["id"].tolist() == protocol.real["id"].tolist()
    other, = build_protocols(params(protocols="stylegan-v", seed=1))
    assert other.real["id"].tolist()[:2048] != protocol.real["id"].tolist()[:2048]


def test_is10k_and_a_capped_budget_are_recorded():
    is10k, capped = build_protocols(params(protocols="ucf101-is10k,stylegan-v", reference_sample_limit=100, ucf101_subset="train,test"))
    assert len(is10k.prompts) == 100 and is10k.real.empty and is10k.reference.generated_videos == 10_000
    assert is10k.deviations == ["evaluate.reference_sample_limit 100: 100 generated / 0 real videos instead of 10000 / 0"]
    assert capped.split == "trainlist01+testlist01" and capped.details["list_videos"] == 9537 + 3783
    assert capped.real_limit == 100 and len(capped.real) == 105
    # The real set is the first videos of the same seeded shuffle, whatever the budget
    full, = build_protocols(params(protocols="stylegan-v", ucf101_subset="train,test"))
    assert full.real["id"].tolist()[:100] == capped.real["id"].tolist()[:100]
    (template,) = build_protocols(params(protocols="stylegan-v", ucf101_prompts="template", reference_sample_limit=8))
    assert template.details["prompts"] == "class-name template" and all(prompt.startswith("a person ") for prompt in template.prompts)


def test_msrvtt_paper_on_the_1k_a_file_says_it_is_not_the_2990():
    (protocol,) = build_protocols(Params(evaluate=EvaluateParams(protocols="msrvtt-paper", msrvtt_annotations=str(SPLITS / "msrvtt" / "MSRVTT_JSFUSION_test.csv"),
                                                                msrvtt_videos="/data/msrvtt")))
    assert protocol.split == "1k-A" and len(protocol.prompts) == 1000
    assert any("1k-A split (1000 videos) instead of the 2990" in text for text in protocol.deviations)
    assert any("name 1000 videos, fewer than the 2990" in text for text in protocol.deviations)
    assert protocol.view.frames == 16 and protocol.reference.generated_videos * protocol.view.frames == 47_840


def test_reference_protocols_name_the_files_they_need():
    with pytest.raises(ParamsError, match="evaluate.ucf101_lists: required for the ucf101-is10k protocol"):
        EvaluateParams(protocols="ucf101-is10k")
    with pytest.raises(ParamsError, match="evaluate.ucf101_videos: required for the stylegan-v protocol"):
        EvaluateParams(protocols="stylegan-v", ucf101_lists="lists")
    with pytest.raises(ParamsError, match="evaluate.ucf101_subset: 'val' is not one of"):
        EvaluateParams(ucf101_subset="val")
