"""Preference data with checkable quality, the written rubric that grades it, and the labels and
win rates it gives (chapter 05).

Four kinds of prompts whose answers a rule can check: one-digit sums, capitals, "answer in one
word" and "use exactly three bullet points". For each prompt the model writes two (or more)
responses; a pair of them is what a human or an LLM judge is asked to compare.

The rubric is what a careful human annotator would be told, applied in order (lexicographic):
1. an answer at all (a non-empty response), 2. correct (the sum, the capital), 3. follows the
prompt's rule, 4. shorter (fewer words: these questions want short answers). Two responses equal
on all four are a tie (identical responses always are): the annotator has no preference to give.

Labels: +1 means the pair's `first` response is preferred, -1 the `second`, 0 a tie. The simulated
human annotator (`rubric_labels`) is the rubric with a fraction of its verdicts flipped (human
disagreement); the noise-free rubric, held out, judges the win rates of the trained policies.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

from .evaluate import wilson_interval
from .number_words import WORDS_PATTERN, as_number

RULES = ("one_word", "three_bullets")
CRITERIA = ("answered", "correct", "rule", "shorter")

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Russia": "Moscow", "Egypt": "Cairo", "China": "Beijing", "Greece": "Athens", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw",
    "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Peru": "Lima", "Argentina": "Buenos Aires", "Kenya": "Nairobi",
    "Thailand": "Bangkok", "Hungary": "Budapest", "Belgium": "Brussels", "Cuba": "Havana",
    "Turkey": "Ankara", "Australia": "Canberra", "India": "New Delhi", "Iran": "Tehran",
    "Chile": "Santiago", "Colombia": "Bogota",
}

# (singular, plural): "Name a fruit. Answer in one word." / "List three fruits. ..."
CATEGORIES = [
    ("fruit", "fruits"), ("color", "colors"), ("animal", "animals"), ("planet", "planets"),
    ("vegetable", "vegetables"), ("flower", "flowers"), ("tree", "trees"), ("bird", "birds"),
    ("fish", "fish"), ("metal", "metals"), ("musical instrument", "musical instruments"),
    ("sport", "sports"), ("ocean", "oceans"), ("continent", "continents"), ("month", "months"),
    ("day of the week", "days of the week"), ("language", "languages"), ("country", "countries"),
    ("insect", "insects"), ("gemstone", "gemstones"), ("city", "cities"), ("vehicle", "vehicles"),
    ("drink", "drinks"), ("dog breed", "dog breeds"), ("kitchen tool", "kitchen tools"),
    ("board game", "board games"), ("spice", "spices"), ("river", "rivers"),
]

_NUMBER = re.compile(r"-?\d+|\b(?:" + WORDS_PATTERN + r")\b", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")


@dataclass(frozen=True)
class PreferencePrompt:
    """A question with checkable quality: `answer` (if any) is the correct one, `rule` a format rule."""
    text: str
    kind: str
    answer: str | None = None
    rule: str | None = None

    def __post_init__(self):
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"text must be a non-empty string, got {self.text!r}")
        if self.rule is not None and self.rule not in RULES:
            raise ValueError(f"rule must be None or one of {RULES}, got {self.rule!r}")


@dataclass(frozen=True)
class Pair:
    """Two responses to one prompt, to be compared; `first` and `second` are just an order."""
    prompt: PreferencePrompt
    first: str
    second: str

    def __post_init__(self):
        if not isinstance(self.prompt, PreferencePrompt):
            raise TypeError(f"prompt must be a PreferencePrompt, got {type(self.prompt).__name__}")
        for name in ("first", "second"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"pair field {name!r} must be a string (the response), "
                                f"got {getattr(self, name)!r}")

    @property
    def identical(self) -> bool:
        return self.first.strip() == self.second.strip()


def prompt_pool() -> dict[str, list[PreferencePrompt]]:
    """Every prompt of the chapter, by kind: 81 sums, 32 capitals, 28 one-word, 28 three-bullet."""
    return {
        "arithmetic": [PreferencePrompt(f"What is {a} plus {b}?", "arithmetic", str(a + b))
                       for a in range(1, 10) for b in range(1, 10)],
        "capital": [PreferencePrompt(f"What is the capital of {country}?", "capital", city)
                    for country, city in CAPITALS.items()],
        "one_word": [PreferencePrompt(f"Name a {one}. Answer in one word.", "one_word", rule="one_word")
                     for one, _ in CATEGORIES],
        "three_bullets": [PreferencePrompt(f"List three {many}. Use exactly three bullet points.",
                                           "three_bullets", rule="three_bullets")
                          for _, many in CATEGORIES],
    }


def _take_in_turn(queues: list[list], n: int) -> list:
    """Up to n items popped from the queues in turn (one from each, round and round)."""
    taken = []
    while len(taken) < n and any(queues):
        for queue in queues:
            if queue and len(taken) < n:
                taken.append(queue.pop())
    return taken


def split_prompts(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[PreferencePrompt], list[PreferencePrompt]]:
    """Disjoint train and held-out prompts, each taking the four kinds in turn (shuffled, seeded)."""
    pool = prompt_pool()
    capacity = sum(len(p) for p in pool.values())
    if n_train < 1 or n_eval < 1 or n_train + n_eval > capacity:
        raise ValueError(f"need n_train >= 1, n_eval >= 1 and n_train + n_eval <= {capacity}, "
                         f"got {n_train} and {n_eval}")
    rng = random.Random(seed)
    queues = [rng.sample(prompts, len(prompts)) for prompts in pool.values()]
    train = _take_in_turn(queues, n_train)
    return train, _take_in_turn(queues, n_eval)


def make_pairs(prompts: Sequence[PreferencePrompt], responses: Sequence[Sequence[str]]) -> list[Pair]:
    """All pairs (i < j) among each prompt's responses: k responses give k·(k-1)/2 pairs."""
    if len(prompts) != len(responses):
        raise ValueError(f"need one list of responses per prompt, got {len(prompts)} prompts and "
                         f"{len(responses)} lists")
    return [Pair(p, rs[i], rs[j]) for p, rs in zip(prompts, responses)
            for i in range(len(rs)) for j in range(i + 1, len(rs))]


# ----------------------------------------------------------------------------- the rubric

def words(response: str) -> list[str]:
    """The response's words, punctuation stripped ("Paris." is one word)."""
    return [w for w in (t.strip(".,;:!?\"'()*-•") for t in response.split()) if w]


def last_number(response: str) -> int | None:
    """The last number in the response, digits or a word up to twenty; None when there is none."""
    found = _NUMBER.findall(response)
    return as_number(found[-1]) if found else None


def is_correct(prompt: PreferencePrompt, response: str) -> bool:
    """Sums: the last number stated is the sum. Capitals: the capital is named. No answer: True."""
    if prompt.answer is None:
        return True
    if prompt.kind == "arithmetic":
        return last_number(response) == int(prompt.answer)
    return prompt.answer.lower() in response.lower()


def follows_rule(prompt: PreferencePrompt, response: str) -> bool:
    """one_word: exactly one word. three_bullets: exactly three bullet lines. No rule: True."""
    if prompt.rule == "one_word":
        return len(words(response)) == 1
    if prompt.rule == "three_bullets":
        return sum(bool(_BULLET.match(line)) for line in response.splitlines()) == 3
    return True


def rubric_score(prompt: PreferencePrompt, response: str) -> tuple[bool, bool, bool, int]:
    """The rubric as a tuple compared in order: (answered, correct, follows rule, −words)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a string, got {response!r}")
    answered = bool(response.strip())
    return (answered, answered and is_correct(prompt, response),
            answered and follows_rule(prompt, response), -len(words(response)))


def rubric_preference(pair: Pair) -> int:
    """+1 when the rubric prefers `first`, -1 when it prefers `second`, 0 for a tie."""
    a, b = rubric_score(pair.prompt, pair.first), rubric_score(pair.prompt, pair.second)
    return (a > b) - (a < b)


def deciding_criterion(pair: Pair) -> str:
    """Which rubric line decided the pair: answered, correct, rule, shorter, or tie."""
    a, b = rubric_score(pair.prompt, pair.first), rubric_score(pair.prompt, pair.second)
    for name, x, y in zip(CRITERIA, a, b):
        if x != y:
            return name
    return "tie"


def sample_responses(model, tokenizer, prompts: Sequence[PreferencePrompt], n: int = 2,
                     max_new_tokens: int = 32, temperature: float = 0.7, batch_size: int = 32,
                     seed: int = 0, top_k: int | None = None, top_p: float | None = None) -> list[list[str]]:
    """`n` sampled responses per prompt (one batched `generate` call, at `temperature`, cut to
    `top_k` / `top_p` only when given; seeded on a forked stream), grouped by prompt."""
    from .models import sample_replies

    return sample_replies(model, tokenizer, [p.text for p in prompts], n, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size, seed=seed)


# ----------------------------------------------------------------------------- labels

def check_labels(pairs: Sequence[Pair], labels: Sequence[int]) -> None:
    """One label per pair, each +1 (first), -1 (second) or 0 (tie); a ValueError saying what is wrong."""
    if len(pairs) != len(labels):
        raise ValueError(f"need one label per pair, got {len(labels)} labels for {len(pairs)} pairs")
    if bad := [x for x in labels if x not in (-1, 0, 1)]:
        raise ValueError(f"labels must be +1 (first), -1 (second) or 0 (tie), got {bad[:3]}")


def rubric_labels(pairs: Sequence[Pair], noise: float = 0.0, seed: int = 0) -> list[int]:
    """The simulated human: the rubric's verdicts, with round(noise · decided) of the decided pairs,
    chosen at random (seeded), flipped to stand for annotators who disagree. Ties stay ties."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be a fraction in [0, 1], got {noise}")
    labels = [rubric_preference(pair) for pair in pairs]
    decided = [i for i, label in enumerate(labels) if label != 0]
    for i in random.Random(seed).sample(decided, round(noise * len(decided))):
        labels[i] = -labels[i]
    return labels


def agreement(labels: Sequence[int], reference: Sequence[int]) -> tuple[int, int]:
    """(agreeing, compared): pairs where both label sources decided, and how many of them agree."""
    if len(labels) != len(reference):
        raise ValueError(f"need equally many labels, got {len(labels)} and {len(reference)}")
    both = [(a, b) for a, b in zip(labels, reference) if a != 0 and b != 0]
    return sum(a == b for a, b in both), len(both)


# ----------------------------------------------------------------------------- win rates

@dataclass(frozen=True)
class WinRate:
    """Rubric verdicts of candidate vs baseline on the same prompts: wins, losses, ties."""
    wins: int
    losses: int
    ties: int

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def rate(self) -> float:
        """Wins among the decided prompts (ties left out); NaN when none was decided."""
        decided = self.wins + self.losses
        return self.wins / decided if decided else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of `rate` ((0, 1) when nothing was decided)."""
        decided = self.wins + self.losses
        return wilson_interval(self.wins, decided) if decided else (0.0, 1.0)

    @property
    def rate_text(self) -> str:
        """"78% [63%, 89%]": the rate and its interval, or "– (all ties)" when nothing was decided."""
        if not self.wins + self.losses:
            return "– (all ties)"
        low, high = self.interval
        return f"{self.rate:.0%} [{low:.0%}, {high:.0%}]"

    def __str__(self) -> str:
        return f"{self.rate_text} ({self.wins} wins, {self.losses} losses, {self.ties} ties of {self.n})"


def win_rate(prompts: Sequence[PreferencePrompt], candidate: Sequence[str], baseline: Sequence[str]) -> WinRate:
    """How often the rubric (noise-free) prefers `candidate` over `baseline`, prompt by prompt."""
    if not len(prompts) == len(candidate) == len(baseline) or not prompts:
        raise ValueError(f"need one candidate and one baseline response per prompt (> 0), got "
                         f"{len(prompts)} prompts, {len(candidate)} and {len(baseline)} responses")
    verdicts = [rubric_preference(Pair(p, c, b)) for p, c, b in zip(prompts, candidate, baseline)]
    return WinRate(verdicts.count(1), verdicts.count(-1), verdicts.count(0))


def wins_by_criterion(prompts: Sequence[PreferencePrompt], candidate: Sequence[str],
                      baseline: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(wins, losses) of candidate vs baseline, split by the rubric line that decided each prompt."""
    split: dict[str, list[int]] = {}
    for p, c, b in zip(prompts, candidate, baseline):
        pair = Pair(p, c, b)
        verdict = rubric_preference(pair)
        if verdict != 0:
            split.setdefault(deciding_criterion(pair), [0, 0])[verdict == -1] += 1
    return {line: (w, l) for line, (w, l) in split.items()}
