"""Benchmark split files: UCF-101 (`ucfTrainTestlist/`) and MSR-VTT (the test annotations and the
retrieval 1k-A split), read strictly: a malformed file is an error naming the file and the line
or key at fault, never a silently shorter list.

UCF-101
    classInd.txt       `1 ApplyEyeMakeup` .. `101 YoYo`
    trainlist0N.txt    `ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1` (label = classInd index)
    testlist0N.txt     `ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi`
  The files ship with CRLF line endings. Known quirk: for one class the folder (and classInd)
  say `HandstandPushups` but the file stem says `v_HandStandPushups_gNN_cNN.avi` (28/37/42 lines
  of testlist01/02/03), so the stem's class matches the folder case-insensitively, and the folder
  matches classInd case-insensitively too (copies exist that renamed the folder). The path is kept
  as the list spells it: it names the file on disk. Counts: testlist01/02/03 = 3783/3734/3696,
  trainlist01/02/03 = 9537/9586/9624 videos.

MSR-VTT
    test_videodatainfo.json  {videos: [{video_id, split, ...}], sentences: [{video_id, caption}]}
      2990 videos with split "test" (video7010-video9999), 20 captions each. Text-to-video
      zero-shot evaluation draws one caption per video; the draw is seeded per video id, so it
      does not depend on the file's order or on which other videos are present.
    MSRVTT_JSFUSION_test.csv  `key,vid_key,video_id,sentence`, 1000 rows: the retrieval 1k-A split,
      one caption per video.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path


class DatasetFileError(ValueError):
    pass


@dataclass(frozen=True)
class UCFVideo:
    path: str  # relative to the UCF-101 video root: {Class}/v_{Class}_gNN_cNN.avi
    label: int  # 0-based class index
    class_name: str  # as classInd.txt spells it


@dataclass(frozen=True)
class CaptionedVideo:
    video_id: str
    caption: str


UCF_NAME = re.compile(r"^(?P<folder>[A-Za-z]+)/v_(?P<cls>[A-Za-z]+)_g(?P<group>\d{2})_c(?P<clip>\d{2})\.avi$")


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise DatasetFileError(f"{path}: file not found")
    return [(number, line.strip()) for number, line in enumerate(path.read_text().splitlines(), start=1) if line.strip()]


def read_class_index(path: str | Path) -> list[str]:
    """classInd.txt -> class names in label order (label k-1 on line `k Name`)."""
    path = Path(path)
    names = []
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or not parts[1].isalpha():
            raise DatasetFileError(f"{path}:{number}: expected `INDEX ClassName`, got {line!r}")
        if int(parts[0]) != len(names) + 1:
            raise DatasetFileError(f"{path}:{number}: index {parts[0]}, expected {len(names) + 1} (indices run 1, 2, ... in order)")
        names.append(parts[1])
    if not names:
        raise DatasetFileError(f"{path}: no classes")
    return names


def read_ucf101_split(list_dir: str | Path, split: int, subset: str = "test") -> list[UCFVideo]:
    """The videos of trainlist0{split}.txt or testlist0{split}.txt, with classInd's labels."""
    list_dir = Path(list_dir)
    if split not in (1, 2, 3) or subset not in ("train", "test"):
        raise DatasetFileError(f"UCF-101 split {split!r}/{subset!r}: split is 1, 2 or 3, subset 'train' or 'test'")
    classes = read_class_index(list_dir / "classInd.txt")
    by_key = {name.lower(): label for label, name in enumerate(classes)}
    path = list_dir / f"{subset}list0{split}.txt"
    videos = []
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != (2 if subset == "train" else 1):
            raise DatasetFileError(f"{path}:{number}: expected `Class/v_Class_gNN_cNN.avi{' LABEL' if subset == 'train' else ''}`, got {line!r}")
        match = UCF_NAME.match(parts[0])
        if not match or match["folder"].lower() != match["cls"].lower():
            raise DatasetFileError(f"{path}:{number}: {parts[0]!r} is not a UCF-101 video path (Class/v_Class_gNN_cNN.avi)")
        label = by_key.get(match["folder"].lower())
        if label is None:
            raise DatasetFileError(f"{path}:{number}: class {match['folder']!r} is not in {list_dir / 'classInd.txt'}")
        if subset == "train" and parts[1] != str(label + 1):
            raise DatasetFileError(f"{path}:{number}: label {parts[1]} but classInd.txt gives {match['folder']} index {label + 1}")
        videos.append(UCFVideo(parts[0], label, classes[label]))
    if not videos:
        raise DatasetFileError(f"{path}: no videos")
    return videos


# Leading verbs of UCF-101 class names that are not already gerunds.
GERUNDS = {"apply": "applying", "blow": "blowing", "throw": "throwing", "punch": "punching", "swing": "swinging", "clean": "cleaning"}


def class_words(class_name: str) -> list[str]:
    """`ApplyEyeMakeup` -> ['apply', 'eye', 'makeup']."""
    return [word.lower() for word in re.findall(r"[A-Z][a-z]*|[a-z]+|\d+", class_name)]


def class_action(class_name: str) -> str:
    """A verb phrase for a class: `ApplyEyeMakeup` -> 'applying eye makeup', `PlayingCello` ->
    'playing cello', `Archery` -> 'doing archery' (a noun gets 'doing')."""
    words = class_words(class_name)
    if words[0] in GERUNDS:
        return " ".join([GERUNDS[words[0]], *words[1:]])
    if any(word.endswith("ing") for word in words):
        return " ".join(words)
    return "doing " + " ".join(words)


def class_prompt(class_name: str, template: str = "a person {action}", overrides: dict[str, str] | None = None) -> str:
    """The text prompt for a class. `template` may use {action}, {words} and {name}."""
    if overrides and class_name in overrides:
        return overrides[class_name]
    return template.format(action=class_action(class_name), words=" ".join(class_words(class_name)), name=class_name)


def files_digest(paths: list[str | Path]) -> str:
    """sha256 over the named files' bytes (name, then content, in the given order): what a
    protocol records to say which benchmark lists it read."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    return digest.hexdigest()


def seeded_choice(key: str, seed: int, count: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big") % count


def read_msrvtt_test(path: str | Path, seed: int, split: str = "test") -> list[CaptionedVideo]:
    """One seeded caption per video of `split` in test_videodatainfo.json, in video order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: file not found")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetFileError(f"{path}: not valid JSON ({error})") from None
    for key in ("videos", "sentences"):
        if not isinstance(info, dict) or not isinstance(info.get(key), list):
            raise DatasetFileError(f"{path}: missing list {key!r} (expected MSR-VTT's test_videodatainfo.json)")
    videos = []
    for k, video in enumerate(info["videos"]):
        for key in ("video_id", "split"):
            if not isinstance(video, dict) or not isinstance(video.get(key), str):
                raise DatasetFileError(f"{path}: videos[{k}] has no string {key!r}")
        if video["split"] == split:
            videos.append(video["video_id"])
    captions: dict[str, list[str]] = {video: [] for video in videos}
    for k, sentence in enumerate(info["sentences"]):
        for key in ("video_id", "caption"):
            if not isinstance(sentence, dict) or not isinstance(sentence.get(key), str):
                raise DatasetFileError(f"{path}: sentences[{k}] has no string {key!r}")
        if sentence["video_id"] in captions:
            captions[sentence["video_id"]].append(sentence["caption"])
    if not videos:
        raise DatasetFileError(f"{path}: no video with split {split!r}")
    missing = [video for video, texts in captions.items() if not texts]
    if missing:
        raise DatasetFileError(f"{path}: {len(missing)} {split} video(s) without a sentence, e.g. {missing[0]!r}")
    order = sorted(videos, key=lambda video: (len(video), video))  # video7010 .. video9999
    return [CaptionedVideo(video, captions[video][seeded_choice(video, seed, len(captions[video]))]) for video in order]


def read_msrvtt_1ka(path: str | Path) -> list[CaptionedVideo]:
    """MSRVTT_JSFUSION_test.csv (the retrieval 1k-A split): one caption per video, in file order."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFileError(f"{path}: file not found")
    with open(path, newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None or [name.strip() for name in header] != ["key", "vid_key", "video_id", "sentence"]:
            raise DatasetFileError(f"{path}:1: header {header!r}, expected key,vid_key,video_id,sentence")
        videos = []
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != 4 or not row[2].strip() or not row[3].strip():
                raise DatasetFileError(f"{path}:{number}: expected 4 fields with a video_id and a sentence, got {row!r}")
            videos.append(CaptionedVideo(row[2].strip(), row[3].strip()))
    if not videos:
        raise DatasetFileError(f"{path}: no rows")
    return videos
