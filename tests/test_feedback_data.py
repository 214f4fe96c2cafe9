"""The chapter-05 prompt set and its rubric (course_lib.preference_data)."""
import pytest

from course_lib.preference_data import (
    Pair, PreferencePrompt, deciding_criterion, follows_rule, is_correct, last_number, make_pairs,
    prompt_pool, rubric_preference, rubric_score, split_prompts, words)

SUM = PreferencePrompt("What is 3 plus 4?", "arithmetic", "7")
CAPITAL = PreferencePrompt("What is the capital of France?", "capital", "Paris")
ONE_WORD = PreferencePrompt("Name a fruit. Answer in one word.", "one_word", rule="one_word")
BULLETS = PreferencePrompt("List three colors. Use exactly three bullet points.", "three_bullets",
                           rule="three_bullets")


def test_split_is_disjoint_balanced_and_seeded():
    train, held_out = split_prompts(32, 24, seed=0)
    assert len(train) == 32 and len(held_out) == 24
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert [sum(p.kind == k for p in train) for k in prompt_pool()] == [8, 8, 8, 8]
    assert [sum(p.kind == k for p in held_out) for k in prompt_pool()] == [6, 6, 6, 6]
    assert split_prompts(32, 24, seed=0) == (train, held_out)
    assert split_prompts(32, 24, seed=1)[0] != train


def test_split_rejects_more_prompts_than_the_pool():
    total = sum(len(p) for p in prompt_pool().values())
    with pytest.raises(ValueError, match="n_train"):
        split_prompts(total, 1)
    with pytest.raises(ValueError, match="n_train"):
        split_prompts(0, 5)


@pytest.mark.parametrize("response, expected", [
    ("3 + 4 = 7", True), ("Seven.", True), ("The answer is 7, since 3 + 4 = 7.", True),
    ("To add them, which is 8.", False), ("3 plus 4", False), ("", False), ("no idea", False)])
def test_sums_are_checked_by_the_last_number(response, expected):
    assert is_correct(SUM, response) is expected


def test_capitals_rules_and_words():
    assert is_correct(CAPITAL, "The capital of France is paris.")
    assert not is_correct(CAPITAL, "Lyon.")
    assert follows_rule(ONE_WORD, "Apple.") and not follows_rule(ONE_WORD, "An apple.")
    assert follows_rule(BULLETS, "* red\n* blue\n- green")
    assert follows_rule(BULLETS, "1. red\n2. blue\n3. green")
    assert not follows_rule(BULLETS, "* red\n* blue")
    assert follows_rule(SUM, "anything at all")  # no rule: always followed
    assert words("Paris, (France).") == ["Paris", "France"]
    assert last_number("none here") is None


def test_rubric_order_answered_correct_rule_shorter():
    assert rubric_preference(Pair(SUM, "7", "")) == 1  # any answer beats none
    assert rubric_preference(Pair(SUM, "It is 8.", "After some thought, the sum is 7.")) == -1  # correct beats short
    assert deciding_criterion(Pair(SUM, "It is 8.", "After some thought, the sum is 7.")) == "correct"
    assert rubric_preference(Pair(ONE_WORD, "A ripe apple.", "Apple")) == -1
    assert deciding_criterion(Pair(ONE_WORD, "A ripe apple.", "Apple")) == "rule"
    assert rubric_preference(Pair(CAPITAL, "It is Paris, a city.", "Paris!")) == -1
    assert deciding_criterion(Pair(CAPITAL, "It is Paris, a city.", "Paris!")) == "shorter"


def test_ties_empty_and_identical_responses():
    assert rubric_preference(Pair(CAPITAL, "Paris", "Paris")) == 0
    assert Pair(CAPITAL, "Paris ", "Paris").identical
    assert rubric_preference(Pair(CAPITAL, "", "  ")) == 0  # two non-answers: a tie
    assert rubric_preference(Pair(CAPITAL, "Rome", "Nice")) == 0  # equally wrong, equally long
    assert deciding_criterion(Pair(CAPITAL, "", "")) == "tie"
    assert rubric_score(CAPITAL, "") == (False, False, False, 0)


def test_bad_pairs_and_prompts_raise_clear_errors():
    with pytest.raises(TypeError, match="'second'"):
        Pair(CAPITAL, "Paris", None)
    with pytest.raises(TypeError, match="PreferencePrompt"):
        Pair("What is the capital of France?", "Paris", "Lyon")
    with pytest.raises(ValueError, match="rule"):
        PreferencePrompt("Say hi.", "other", rule="two_words")
    with pytest.raises(ValueError, match="text"):
        PreferencePrompt("  ", "other")
    with pytest.raises(ValueError, match="one list of responses per prompt"):
        make_pairs([SUM, CAPITAL], [["7", "8"]])


def test_make_pairs_takes_every_pair_of_responses():
    pairs = make_pairs([SUM, CAPITAL], [["7", "8", "9"], ["Paris", "Lyon"]])
    assert [(p.first, p.second) for p in pairs] == [("7", "8"), ("7", "9"), ("8", "9"), ("Paris", "Lyon")]
