"""UCF-101 and MSR-VTT split files: the real lists (../shared/datasets/benchmark-splits/, read in
place) parsed with their quirks and counts; small copies in the real formats; malformed copies
rejected with the file and line or key at fault."""

import hashlib
import json
import shutil

import pytest

from eval.datasets import DatasetFileError, class_prompt, files_digest, read_class_index, read_msrvtt_1ka, read_msrvtt_test, read_ucf101_split
from tests.conftest import SHARED

SPLITS = SHARED / "datasets" / "benchmark-splits"
REAL_UCF = SPLITS / "ucfTrainTestlist"
REAL_1KA = SPLITS / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
# Counts and quirk lines of the official lists (their provenance: benchmark-splits/README.md)
TEST_VIDEOS, TRAIN_VIDEOS = {1: 3783, 2: 3734, 3: 3696}, {1: 9537, 2: 9586, 3: 9624}
QUIRK_LINES = {("test", 1): 28, ("test", 2): 37, ("test", 3): 42, ("train", 1): 100, ("train", 2): 91, ("train", 3): 86}


@pytest.fixture(scope="module")
def real_lists():
    if not REAL_UCF.is_dir():
        pytest.fail(f"real UCF-101 lists not found at {REAL_UCF}; set VERSVIDEO_SHARED to the shared/ folder")
    return REAL_UCF


def test_the_real_files_are_the_documented_ones(real_lists):
    expected = {"classInd.txt": "d7abbb76074d04e80c62ad8a61529bb8eec32ef978569601b2890edec3af0359",
                "testlist01.txt": "81be4765084d72739dca4d11658f7ec369c441ad9e227f11d9468fe2a1c14890"}
    for name, digest in expected.items():
        data = (real_lists / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest and b"\r\n" in data  # CRLF, as shipped


@pytest.mark.parametrize("split", [1, 2, 3])
def test_every_real_ucf101_list_parses_with_its_counts(real_lists, split):
    classes = read_class_index(real_lists / "classInd.txt")
    assert len(classes) == 101 and classes[0] == "ApplyEyeMakeup" and classes[36] == "HandstandPushups" and classes[-1] == "YoYo"
    test, train = read_ucf101_split(real_lists, split, "test"), read_ucf101_split(real_lists, split, "train")
    assert (len(test), len(train)) == (TEST_VIDEOS[split], TRAIN_VIDEOS[split])
    assert {v.label for v in test} == {v.label for v in train} == set(range(101))  # every class in both halves
    assert not {v.path for v in test} & {v.path for v in train}  # a split's halves are disjoint
    for subset, videos in (("test", test), ("train", train)):
        quirky = [v for v in videos if "/v_HandStandPushups_" in v.path]
        assert len(quirky) == QUIRK_LINES[(subset, split)]
        assert all(v.path.startswith("HandstandPushups/") and v.class_name == "HandstandPushups" and v.label == 36 for v in quirky)
    if split == 1:
        assert test[1375].path == "HandstandPushups/v_HandStandPushups_g01_c01.avi"  # testlist01 line 1376, which used to fail
    assert all(v.path.split("/")[0].lower() == v.class_name.lower() for v in test)


def test_a_broken_line_in_a_real_list_names_the_file_and_line(real_lists, tmp_path):
    copy = tmp_path / "ucfTrainTestlist"
    shutil.copytree(real_lists, copy)
    lines = (copy / "trainlist01.txt").read_bytes().split(b"\r\n")
    path, label = lines[4999].split(b" ")
    lines[4999] = path + b" %d" % (int(label) % 101 + 1)  # another class's label
    (copy / "trainlist01.txt").write_bytes(b"\r\n".join(lines))
    with pytest.raises(DatasetFileError, match=r"trainlist01.txt:5000: label \d+ but classInd.txt gives"):
        read_ucf101_split(copy, 1, "train")
    lines = (copy / "testlist02.txt").read_bytes().split(b"\r\n")
    lines[9] = lines[9].replace(b"_g", b"_x", 1)
    (copy / "testlist02.txt").write_bytes(b"\r\n".join(lines))
    with pytest.raises(DatasetFileError, match=r"testlist02.txt:10: .* is not a UCF-101 video path"):
        read_ucf101_split(copy, 2, "test")


def test_the_real_1k_a_split_has_1000_distinct_videos():
    videos = read_msrvtt_1ka(REAL_1KA)
    assert len(videos) == len({v.video_id for v in videos}) == 1000
    assert all(v.video_id.startswith("video") and 7010 <= int(v.video_id[5:]) <= 9999 and v.caption for v in videos)


def test_files_digest_changes_with_any_byte(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x\n")
    b.write_text("y\n")
    first = files_digest([a, b])
    assert first == files_digest([a, b]) and first != files_digest([b, a])
    b.write_text("y\r\n")
    assert files_digest([a, b]) != first

CLASSES = ["ApplyEyeMakeup", "Archery", "HandstandPushups", "PlayingCello", "YoYo"]  # a 5-class copy in the real format


@pytest.fixture
def ucf_lists(tmp_path):
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{k} {name}\r\n" for k, name in enumerate(CLASSES, start=1)))  # CRLF as shipped
    (lists / "trainlist01.txt").write_text(  # the real spelling: folder HandstandPushups, stem HandStandPushups
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandstandPushups/v_HandStandPushups_g08_c01.avi 3\nYoYo/v_YoYo_g25_c05.avi 5\n")
    (lists / "testlist01.txt").write_text(  # and a copy whose folder was renamed to the stem's spelling
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nHandStandPushups/v_HandStandPushups_g01_c02.avi\nPlayingCello/v_PlayingCello_g07_c04.avi\n")
    return lists


def test_ucf101_splits_with_the_handstand_spelling_quirk(ucf_lists):
    assert read_class_index(ucf_lists / "classInd.txt") == CLASSES
    test = read_ucf101_split(ucf_lists, 1, "test")
    assert [(v.path, v.label, v.class_name) for v in test] == [
        ("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 0, "ApplyEyeMakeup"),
        ("HandStandPushups/v_HandStandPushups_g01_c02.avi", 2, "HandstandPushups"),  # path spelling kept, classInd's name
        ("PlayingCello/v_PlayingCello_g07_c04.avi", 3, "PlayingCello"),
    ]
    assert [v.label for v in read_ucf101_split(ucf_lists, 1, "train")] == [0, 2, 4]


@pytest.mark.parametrize("file, content, message", [
    ("classInd.txt", "1 ApplyEyeMakeup\n3 Archery\n", r"classInd.txt:2: index 3, expected 2"),
    ("classInd.txt", "1 ApplyEyeMakeup\nArchery\n", r"classInd.txt:2: expected `INDEX ClassName`"),
    ("trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 2\n", r"trainlist01.txt:1: label 2 but classInd.txt gives ApplyEyeMakeup index 1"),
    ("testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nBoxing/v_Boxing_g01_c01.avi\n", r"testlist01.txt:2: class 'Boxing' is not in"),
    ("testlist01.txt", "ApplyEyeMakeup/v_Archery_g01_c01.avi\n", r"testlist01.txt:1: .* is not a UCF-101 video path"),
    ("testlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\n", r"testlist01.txt:1: expected"),
])
def test_malformed_ucf101_files_name_the_line(ucf_lists, file, content, message):
    (ucf_lists / file).write_text(content)
    subset = "train" if file.startswith("train") else "test"
    with pytest.raises(DatasetFileError, match=message):
        read_ucf101_split(ucf_lists, 1, subset)


def test_missing_split_file(ucf_lists):
    with pytest.raises(DatasetFileError, match="testlist02.txt: file not found"):
        read_ucf101_split(ucf_lists, 2, "test")


def test_class_prompts():
    assert class_prompt("ApplyEyeMakeup") == "a person applying eye makeup"
    assert class_prompt("PlayingCello") == "a person playing cello"
    assert class_prompt("Archery") == "a person doing archery"
    assert class_prompt("YoYo", "{words}") == "yo yo"
    assert class_prompt("Archery", overrides={"Archery": "an archer shooting"}) == "an archer shooting"


def msrvtt_info(videos: int = 3, captions: int = 20) -> dict:
    ids = [f"video{k}" for k in range(7008, 7010 + videos)]  # two validate videos, then test ones
    return {
        "info": {"year": 2016},
        "videos": [{"category": 9, "url": "https://...", "video_id": vid, "start time": 1.0, "end time": 9.0, "id": k,
                    "split": "validate" if k < 2 else "test"} for k, vid in enumerate(ids)],
        "sentences": [{"sen_id": k * captions + c, "video_id": vid, "caption": f"{vid} caption {c}"} for k, vid in enumerate(ids) for c in range(captions)],
    }


def test_msrvtt_test_draws_one_seeded_caption_per_test_video(tmp_path):
    path = tmp_path / "test_videodatainfo.json"
    info = msrvtt_info()
    path.write_text(json.dumps(info))
    picked = read_msrvtt_test(path, seed=0)
    assert [v.video_id for v in picked] == ["video7010", "video7011", "video7012"]
    assert all(v.caption.startswith(v.video_id + " caption") for v in picked)
    assert picked == read_msrvtt_test(path, seed=0)
    info["sentences"].reverse()  # file order does not change the draw... 
    path.write_text(json.dumps(info))
    reordered = read_msrvtt_test(path, seed=0)
    assert {v.video_id for v in reordered} == {v.video_id for v in picked}
    assert [v.caption for v in read_msrvtt_test(path, seed=1)] != [v.caption for v in picked]  # ...the seed does


@pytest.mark.parametrize("break_it, message", [
    (lambda info: info.pop("sentences"), r"missing list 'sentences'"),
    (lambda info: info["videos"][3].pop("split"), r"videos\[3\] has no string 'split'"),
    (lambda info: info["sentences"][5].pop("caption"), r"sentences\[5\] has no string 'caption'"),
    (lambda info: info.update(sentences=[s for s in info["sentences"] if s["video_id"] != "video7011"]), r"1 test video\(s\) without a sentence, e.g. 'video7011'"),
])
def test_malformed_msrvtt_annotations_name_the_key(tmp_path, break_it, message):
    info = msrvtt_info()
    break_it(info)
    path = tmp_path / "test_videodatainfo.json"
    path.write_text(json.dumps(info))
    with pytest.raises(DatasetFileError, match=message):
        read_msrvtt_test(path, seed=0)


def test_msrvtt_1k_a_csv(tmp_path):
    path = tmp_path / "MSRVTT_JSFUSION_test.csv"
    path.write_text("key,vid_key,video_id,sentence\nret0,msr7579,video7579,a girl wearing red top and black trouser is putting a sweater on a dog\n"
                    "ret1,msr7725,video7725,young people sit around the edges of a room clapping and raising their arms while others dance\n")
    assert [(v.video_id, v.caption.split()[0]) for v in read_msrvtt_1ka(path)] == [("video7579", "a"), ("video7725", "young")]
    path.write_text("key,vid_key,video_id,sentence\nret0,msr7579,video7579,fine\nret1,msr7725,,no video\n")
    with pytest.raises(DatasetFileError, match=r"MSRVTT_JSFUSION_test.csv:3: expected 4 fields with a video_id"):
        read_msrvtt_1ka(path)
    path.write_text("vid,sentence\nvideo1,x\n")
    with pytest.raises(DatasetFileError, match=r":1: header"):
        read_msrvtt_1ka(path)
