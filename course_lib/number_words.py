"""Numbers as replies write them: digits, or English words up to twenty (chapters 05-06).

One table for both chapters' graders, each keeping its own rule: the rubric of chapter 05 reads a
reply's *last* number (`preference_data.last_number`), self-improvement in chapter 06 the number the
reply *states as its answer* (`self_improve.extract_answer`).
"""
from __future__ import annotations

NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
# the words as a regex alternation, longest first, so that "seventeen" is never read as "seven"
WORDS_PATTERN = "|".join(sorted(NUMBER_WORDS, key=len, reverse=True))


def as_number(text: str) -> int | float:
    """The value of a number as written: "seven" -> 7, "12" -> 12, "-3" -> -3, "2.5" -> 2.5, "4.0" -> 4."""
    word = text.lower()
    if word in NUMBER_WORDS:
        return NUMBER_WORDS[word]
    value = float(text)
    return int(value) if value.is_integer() else value
