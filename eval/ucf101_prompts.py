"""Text prompts for the 101 UCF-101 classes, written by hand as short English sentences.

Text-to-video papers evaluate UCF-101 by prompting with a sentence per class. Class names made into
prompts by a template read badly for most classes ("a person golf swing", "a person band
marching"), and a text encoder scores what it is given; so every class has its own sentence here.
The table's sha256 goes into every protocol record that uses it, so a number is only compared
with numbers made from the same sentences. The template (eval/datasets.py `class_prompt`) stays
available (`evaluate.ucf101_prompts: template`) for comparison with papers that prompt with
the raw class names.
"""

from __future__ import annotations

import hashlib
import json

UCF101_PROMPTS: dict[str, str] = {
    "ApplyEyeMakeup": "a person applying eye makeup",
    "ApplyLipstick": "a person applying lipstick",
    "Archery": "a person shooting an arrow with a bow",
    "BabyCrawling": "a baby crawling",
    "BalanceBeam": "a gymnast performing on a balance beam",
    "BandMarching": "a marching band",
    "BaseballPitch": "a baseball pitcher throwing a pitch",
    "Basketball": "a person shooting a basketball",
    "BasketballDunk": "a basketball player dunking the ball",
    "BenchPress": "a person lifting a barbell on a bench press",
    "Biking": "a person riding a bicycle",
    "Billiards": "a person playing billiards",
    "BlowDryHair": "a person blow-drying their hair",
    "BlowingCandles": "a person blowing out candles",
    "BodyWeightSquats": "a person doing bodyweight squats",
    "Bowling": "a person bowling",
    "BoxingPunchingBag": "a boxer hitting a punching bag",
    "BoxingSpeedBag": "a boxer hitting a speed bag",
    "BreastStroke": "a person swimming breaststroke",
    "BrushingTeeth": "a person brushing their teeth",
    "CleanAndJerk": "a weightlifter doing a clean and jerk",
    "CliffDiving": "a person diving off a cliff into the sea",
    "CricketBowling": "a cricket player bowling a ball",
    "CricketShot": "a cricket batsman hitting a shot",
    "CuttingInKitchen": "a person cutting vegetables in a kitchen",
    "Diving": "a diver jumping from a diving board",
    "Drumming": "a person playing the drums",
    "Fencing": "two people fencing",
    "FieldHockeyPenalty": "a field hockey player taking a penalty shot",
    "FloorGymnastics": "a gymnast doing a floor routine",
    "FrisbeeCatch": "a person catching a frisbee",
    "FrontCrawl": "a person swimming front crawl",
    "GolfSwing": "a person swinging a golf club",
    "Haircut": "a person getting a haircut",
    "Hammering": "a person hammering a nail",
    "HammerThrow": "an athlete doing the hammer throw",
    "HandstandPushups": "a person doing handstand push-ups",
    "HandstandWalking": "a person walking on their hands",
    "HeadMassage": "a person getting a head massage",
    "HighJump": "an athlete doing the high jump",
    "HorseRace": "horses racing on a track",
    "HorseRiding": "a person riding a horse",
    "HulaHoop": "a person spinning a hula hoop",
    "IceDancing": "a couple ice dancing",
    "JavelinThrow": "an athlete throwing a javelin",
    "JugglingBalls": "a person juggling balls",
    "JumpingJack": "a person doing jumping jacks",
    "JumpRope": "a person jumping rope",
    "Kayaking": "a person paddling a kayak",
    "Knitting": "a person knitting",
    "LongJump": "an athlete doing the long jump",
    "Lunges": "a person doing lunges",
    "MilitaryParade": "soldiers marching in a military parade",
    "Mixing": "a person mixing batter in a bowl",
    "MoppingFloor": "a person mopping the floor",
    "Nunchucks": "a person swinging nunchucks",
    "ParallelBars": "a gymnast performing on the parallel bars",
    "PizzaTossing": "a person tossing pizza dough",
    "PlayingCello": "a person playing the cello",
    "PlayingDaf": "a person playing the daf",
    "PlayingDhol": "a person playing the dhol",
    "PlayingFlute": "a person playing the flute",
    "PlayingGuitar": "a person playing the guitar",
    "PlayingPiano": "a person playing the piano",
    "PlayingSitar": "a person playing the sitar",
    "PlayingTabla": "a person playing the tabla",
    "PlayingViolin": "a person playing the violin",
    "PoleVault": "an athlete doing the pole vault",
    "PommelHorse": "a gymnast performing on the pommel horse",
    "PullUps": "a person doing pull-ups",
    "Punch": "two boxers punching in a boxing match",
    "PushUps": "a person doing push-ups",
    "Rafting": "people rafting down a river",
    "RockClimbingIndoor": "a person climbing an indoor climbing wall",
    "RopeClimbing": "a person climbing a rope",
    "Rowing": "people rowing a boat",
    "SalsaSpin": "a couple dancing a salsa spin",
    "ShavingBeard": "a man shaving his beard",
    "Shotput": "an athlete throwing a shot put",
    "SkateBoarding": "a person riding a skateboard",
    "Skiing": "a person skiing down a slope",
    "Skijet": "a person riding a jet ski",
    "SkyDiving": "a person skydiving",
    "SoccerJuggling": "a person juggling a soccer ball",
    "SoccerPenalty": "a soccer player taking a penalty kick",
    "StillRings": "a gymnast performing on the still rings",
    "SumoWrestling": "two sumo wrestlers wrestling",
    "Surfing": "a person surfing a wave",
    "Swing": "a child on a swing",
    "TableTennisShot": "a person hitting a table tennis ball",
    "TaiChi": "a person practicing tai chi",
    "TennisSwing": "a person swinging a tennis racket",
    "ThrowDiscus": "an athlete throwing a discus",
    "TrampolineJumping": "a person jumping on a trampoline",
    "Typing": "a person typing on a keyboard",
    "UnevenBars": "a gymnast performing on the uneven bars",
    "VolleyballSpiking": "a volleyball player spiking the ball",
    "WalkingWithDog": "a person walking a dog",
    "WallPushups": "a person doing push-ups against a wall",
    "WritingOnBoard": "a person writing on a board",
    "YoYo": "a person playing with a yo-yo",
}


def prompt_table_digest(table: dict[str, str] = UCF101_PROMPTS) -> str:
    """sha256 of the table as sorted JSON: changes whenever any sentence does."""
    return hashlib.sha256(json.dumps(table, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def table_prompt(class_name: str) -> str:
    """The sentence for a classInd.txt class name (matched case-insensitively, as the lists are)."""
    by_key = {name.lower(): prompt for name, prompt in UCF101_PROMPTS.items()}
    if class_name.lower() not in by_key:
        raise KeyError(f"UCF-101 class {class_name!r} has no sentence in eval/ucf101_prompts.py; is classInd.txt the official one?")
    return by_key[class_name.lower()]
