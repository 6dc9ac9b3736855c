"""Lexical similarity after issue 14: Unicode tokens and the anti-gaming item similarity.

The labelled set below is hand-judged: would a careful annotator count the predicted item as
the ground-truth item? Labels are semantic, not what any measure happens to give, so the lexical
backend is allowed misses (synonyms such as "strolls" / "walks" are out of its reach).
"""

from __future__ import annotations

import pytest

from megatron_vcap.rewards.similarity import (
    LexicalSimilarity,
    compute_lexical_similarity,
    content_tokens,
)
from megatron_vcap.rewards.think import compute_tscore
from megatron_vcap.structure import Subject

THRESHOLD = 0.5  # RewardConfig.item_threshold's default

# (predicted item, ground-truth item, field, same item?)
LABELLED = [
    # attributes that match
    ("black hair", "long black hair", "attribute", True),
    ("long dark hair", "long black hair", "attribute", True),
    ("yellow raincoat", "wears a yellow raincoat", "attribute", True),
    ("wearing a yellow raincoat", "yellow raincoat", "attribute", True),
    ("red umbrella", "holds a red umbrella", "attribute", True),
    ("holding a red umbrella", "holds a red umbrella", "attribute", True),
    ("brown fur", "brown fur", "attribute", True),
    ("short brown fur", "brown fur", "attribute", True),
    ("blue collar", "a blue collar", "attribute", True),
    ("a blue collar around its neck", "blue collar", "attribute", True),
    ("wears glasses", "glasses", "attribute", True),
    ("white shirt", "a white t-shirt", "attribute", True),
    ("长长的黑发", "长长的黑发", "attribute", True),
    ("une robe rouge", "une robe rouge", "attribute", True),
    ("robe rouge élégante", "élégante robe rouge", "attribute", True),
    ("tall man", "a tall young man", "attribute", True),
    ("striped scarf", "red striped scarf", "attribute", True),
    ("curly hair", "curly blonde hair", "attribute", True),
    ("🎩 top hat", "🎩 top hat", "attribute", True),
    ("kicks the ball", "kicks the red ball", "action", True),
    # attributes that do not
    ("hair", "long black hair", "attribute", False),
    ("blue umbrella", "red umbrella", "attribute", False),
    ("black hair", "long blonde hair", "attribute", False),
    ("short hair", "long hair", "attribute", False),
    ("umbrella", "holds a red umbrella", "attribute", False),
    ("small dog", "large dog", "attribute", False),
    ("white fur", "brown fur", "attribute", False),
    ("collar", "blue collar", "attribute", False),
    ("red scarf", "red hat", "attribute", False),
    ("glasses", "holds a glass of water", "attribute", False),
    ("open door", "closed door", "attribute", False),
    ("wet hair", "dry hair", "attribute", False),
    ("old man", "young man", "attribute", False),
    ("红色的雨伞", "蓝色的雨伞", "attribute", False),
    ("three balloons", "two balloons", "attribute", False),
    ("a hat", "a red hat and a blue scarf", "attribute", False),
    # actions that match
    ("walking on the sidewalk", "walks along the sidewalk", "action", True),
    ("walks down the sidewalk", "walks along the sidewalk", "action", True),
    ("opens a red umbrella", "opens the umbrella", "action", True),
    ("opened the umbrella", "opens the umbrella", "action", True),
    ("looks at the sky", "looks up at the sky", "action", True),
    ("runs next to the woman", "runs beside the woman", "action", True),
    ("barks at the car", "barks at a car", "action", True),
    ("is barking at a passing car", "barks at a car", "action", True),
    ("the woman opens her umbrella", "opens the umbrella", "action", True),
    ("jumps over the puddle", "jumps over a puddle", "action", True),
    ("picks up the ball", "picks up a ball", "action", True),
    ("throws the ball to the dog", "throws a ball", "action", True),
    ("sits down on the bench", "sits on a bench", "action", True),
    ("turns on the light", "turns the light on", "action", True),
    ("小狗在草地上奔跑", "小狗在草地上奔跑", "action", True),
    ("juggles three balls", "juggles the balls", "action", True),
    ("slowly walks toward the door", "walks toward the door", "action", True),
    ("waving her hand", "waves her hand", "action", True),
    ("drinks coffee from a cup", "drinks from a cup", "action", True),
    ("stirs the soup", "stirs the soup with a spoon", "action", True),
    ("cuts the vegetables", "chops the vegetables", "action", True),
    ("strolls along the sidewalk", "walks along the sidewalk", "action", True),
    ("stands up", "stands up from the chair", "action", True),
    ("pours milk into the glass", "pours milk into a glass", "action", True),
    # actions that do not
    ("sidewalk", "walks along the sidewalk", "action", False),
    ("umbrella", "opens the umbrella", "action", False),
    ("closes the umbrella", "opens the umbrella", "action", False),
    ("walks", "walks along the sidewalk", "action", False),
    ("runs away from the car", "runs toward the car", "action", False),
    ("looks down at the floor", "looks up at the sky", "action", False),
    ("sits down", "stands up", "action", False),
    ("pulls the door", "pushes the door", "action", False),
    ("enters the room", "leaves the room", "action", False),
    ("turns off the light", "turns on the light", "action", False),
    ("picks up the cup", "puts down the cup", "action", False),
    ("barks at the cat", "barks at a car", "action", False),
    ("runs beside the dog", "runs beside the woman", "action", False),
    ("jumps", "jumps into the pool", "action", False),
    ("walks along the beach", "walks along the sidewalk", "action", False),
    ("throws the ball", "catches the ball", "action", False),
    ("lifts the box", "lowers the box", "action", False),
    ("smiles at the camera", "frowns at the camera", "action", False),
    ("ball", "kicks the ball", "action", False),
    ("dances on the stage", "sings on the stage", "action", False),
    ("car", "barks at a car", "action", False),
    ("小狗在睡觉", "小狗在草地上奔跑", "action", False),
    ("🐶 runs", "🐱 runs", "action", False),
    ("opens the door", "opens the window", "action", False),
    ("holds the umbrella", "opens the umbrella", "action", False),
    ("walking", "walking the dog", "action", False),
]


def precision_recall(decide) -> tuple[float, float, int, int, int]:
    tp = fp = fn = 0
    for pred, gt, kind, same in LABELLED:
        match = decide(pred, gt, kind)
        tp += match and same
        fp += match and not same
        fn += same and not match
    return tp / max(1, tp + fp), tp / max(1, tp + fn), tp, fp, fn


def test_labelled_item_pairs_precision_and_recall():
    assert len(LABELLED) >= 40 and len({(p, g) for p, g, _, _ in LABELLED}) == len(LABELLED)
    sim = LexicalSimilarity()
    new = precision_recall(lambda p, g, k: sim.matrix([p], [g], kind=k)[0, 0] >= THRESHOLD)
    # Baseline: plain Dice of content tokens, the item measure before issue 14.
    dice = precision_recall(
        lambda p, g, k: (
            compute_lexical_similarity(content_tokens(p), content_tokens(g)) >= THRESHOLD
        )
    )
    for name, (p, r, tp, fp, fn) in (("dice", dice), ("item", new)):
        print(f"{name}: precision {p:.3f} recall {r:.3f} (tp {tp}, fp {fp}, fn {fn}) "
              f"on {len(LABELLED)} pairs")  # fmt: skip
    assert new[0] >= 0.9 and new[1] >= 0.8
    assert new[0] > dice[0] + 0.2  # fragments and opposites no longer match


@pytest.mark.parametrize(
    "pred, gt",
    [
        ("closes the umbrella", "opens the umbrella"),  # Dice exactly 0.5 before
        ("hair", "long black hair"),
        ("sidewalk", "walks along the sidewalk"),
        ("umbrella", "opens the umbrella"),
    ],
)
def test_issue_examples_do_not_match(pred, gt):
    kind = "attribute" if "hair" in gt else "action"
    assert LexicalSimilarity().matrix([pred], [gt], kind=kind)[0, 0] < THRESHOLD


def test_bare_nouns_no_longer_game_tscore():
    gt = [Subject("a young woman", ["long black hair"], ["walks along the sidewalk",
                                                          "opens the umbrella"])]  # fmt: skip
    gamed = [Subject("a young woman", ["hair"], ["sidewalk", "umbrella"])]
    res = compute_tscore(gamed, gt, LexicalSimilarity(), subject_threshold=0.3, item_threshold=0.5)
    assert res.score == 0.0  # before issue 14: 1.0
    honest = [Subject("a young woman", ["black hair"], ["walking on the sidewalk",
                                                         "opens her umbrella"])]  # fmt: skip
    res = compute_tscore(honest, gt, LexicalSimilarity(), subject_threshold=0.3, item_threshold=0.5)
    assert res.score == 1.0


# ---------------------------------------------------------------- Unicode tokens (item 2)
def test_unicode_tokens_by_hand():
    from megatron_vcap.rewards.similarity import tokenize

    # Chinese: bigrams of the runs between stop characters (的 splits 红色 from 雨伞).
    assert tokenize("红色的雨伞") == ["红色", "雨伞"]
    assert tokenize("小狗在草地上奔跑") == ["小狗", "草地", "地上", "上奔", "奔跑"]
    # Accents folded on Latin letters, NFKC for full-width forms; stems as for English.
    assert tokenize("Âgée ＣＡＦÉ naïve") == tokenize("agee cafe naive") == ["agee", "caf", "naiv"]
    # Emoji are tokens of their own; variation selectors and skin tones are not.
    assert tokenize("🐶👍🏽 dog") == ["🐶", "👍", "dog"]
    assert tokenize("Ελληνικά слово") == ["ελληνικά", "слово"]  # accents folded on Latin only


@pytest.mark.parametrize(
    "text",
    ["一只小狗在草地上奔跑", "長い黒髪の女性", "une femme âgée marche", "🐶🌧️☂️", "키가 큰 남자"],
)
def test_identical_non_ascii_text_has_similarity_one(text):
    sim = LexicalSimilarity()
    for kind in ("subject", "attribute", "action"):
        assert sim.matrix([text], [text], kind=kind)[0, 0] == pytest.approx(1.0)


def test_identical_chinese_structure_scores_tscore_one():
    gt = [
        Subject(
            "一位穿着黄色雨衣的年轻女子", ["长长的黑发", "黄色雨衣"], ["沿着人行道行走", "打开雨伞"]
        )
    ]
    res = compute_tscore(gt, gt, LexicalSimilarity(), subject_threshold=0.3, item_threshold=0.5)
    assert res.score == 1.0
    other = [Subject("一只棕色的小狗", ["棕色的毛"], ["对着汽车吠叫"])]
    res = compute_tscore(other, gt, LexicalSimilarity(), subject_threshold=0.3, item_threshold=0.5)
    assert res.score == 0.0


def test_emoji_are_compared():
    sim = LexicalSimilarity()
    assert sim.matrix(["🐶"], ["🐶"], kind="subject")[0, 0] == 1.0
    assert sim.matrix(["🐶"], ["🐱"], kind="subject")[0, 0] == 0.0
