import math

import pytest
import torch

from course_lib import evaluate


def test_human_corpus_ships_distinct_prose():
    texts = evaluate.human_corpus()
    assert len(texts) == 132 and len(set(texts)) == len(texts)
    assert all(len(t) >= 300 for t in texts)
    assert evaluate.human_corpus(5) == texts[:5]
    with pytest.raises(ValueError):
        evaluate.human_corpus(0)


def test_perplexity_ignores_padding(teacher):
    model, tokenizer = teacher
    texts = [t[:200] for t in evaluate.human_corpus(4)] + ["Short text."]
    one_by_one = evaluate.perplexity(model, tokenizer, texts, max_length=64, batch_size=1)
    batched = evaluate.perplexity(model, tokenizer, texts, max_length=64, batch_size=5)
    assert math.isclose(one_by_one, batched, rel_tol=1e-4)
    assert tokenizer.padding_side == "left", "perplexity must restore the tokenizer's padding side"


def test_perplexity_matches_the_definition(teacher):
    model, tokenizer = teacher
    text = evaluate.human_corpus(1)[0][:150]
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()  # mean NLL over predicted tokens
    assert math.isclose(evaluate.perplexity(model, tokenizer, [text]), math.exp(loss), rel_tol=1e-3)


def test_perplexity_rejects_a_bare_string(teacher):
    model, tokenizer = teacher
    with pytest.raises(ValueError, match="list of strings"):
        evaluate.perplexity(model, tokenizer, "hello")


def test_accuracy_and_wilson_interval():
    assert evaluate.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="equally many"):
        evaluate.accuracy([1], [1, 2])
    low, high = evaluate.wilson_interval(50, 100)
    assert math.isclose(low, 0.4038, abs_tol=1e-3) and math.isclose(high, 0.5962, abs_tol=1e-3)
    assert evaluate.wilson_interval(0, 10)[0] == 0.0 and evaluate.wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        evaluate.wilson_interval(3, 2)


def test_benchmark_reports_the_median_of_repeats():
    calls = []
    timing = evaluate.benchmark(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and len(timing.times) == 5
    assert timing.low <= timing.median <= timing.high
    with pytest.raises(ValueError):
        evaluate.benchmark(lambda: None, repeats=0)
