"""UCF-101 and MSR-VTT split files, written here in their real formats: parsed with the known
quirks, and malformed copies rejected with the file and line or key at fault."""

import json

import pytest

from eval.datasets import DatasetFileError, class_prompt, read_class_index, read_msrvtt_1ka, read_msrvtt_test, read_ucf101_split

CLASSES = ["ApplyEyeMakeup", "Archery", "HandstandPushups", "PlayingCello", "YoYo"]


@pytest.fixture
def ucf_lists(tmp_path):
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{k} {name}\r\n" for k, name in enumerate(CLASSES, start=1)))  # CRLF as shipped
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nHandStandPushups/v_HandStandPushups_g08_c01.avi 3\nYoYo/v_YoYo_g25_c05.avi 5\n")
    (lists / "testlist01.txt").write_text(
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
