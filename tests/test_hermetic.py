"""Hermetic calls: a seeded course_lib call leaves the caller's random stream and tokenizer as it found
them, and gives the same result whatever the global seed (tiny random models, the teacher's tokenizer)."""
import copy

import pytest
import torch

from course_lib.models import generate, make_student
from course_lib.runtime import seeded

PROMPTS = ["Name a colour.", "What is 2 plus 3?", "Say hi."]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from course_lib.models import _prepare_tokenizer, ensure_teacher_checkpoint

    return _prepare_tokenizer(AutoTokenizer.from_pretrained(ensure_teacher_checkpoint()))


def tiny_llama(tokenizer, dropout: float = 0.0):
    """A 2-layer Llama with the teacher's vocabulary, made on its own stream (the test's is untouched)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         attention_dropout=dropout)
    with seeded(0):
        return LlamaForCausalLM(config).eval()


def run_hermetic(call):
    """`call()` twice, after two different global seeds: both results, and whether the global stream
    was left exactly as it was (the next random numbers are those it would have given anyway)."""
    results, untouched = [], []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        results.append(call())
        untouched.append(torch.equal(torch.get_rng_state(), before))
    return results, all(untouched)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_seeded_is_a_fork_of_the_stream():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with seeded(0):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)  # as if the block had not run
    with seeded(0):
        assert torch.equal(torch.rand(3), inside)
    with pytest.raises(ValueError, match="seed"):
        with seeded(-1):
            pass


@pytest.mark.parametrize("side", ["left", "right"])
def test_sampled_generation_is_hermetic(tokenizer, side):
    model = tiny_llama(tokenizer)
    tokenizer.padding_side = side
    call = lambda: generate(model, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, temperature=1.0, seed=3)
    (first, second), untouched = run_hermetic(call)
    assert first == second and untouched and tokenizer.padding_side == side
    other = generate(model, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, temperature=1.0, seed=4)
    assert other != first  # the seed matters (a random model's samples differ)
    tokenizer.padding_side = "left"


def test_every_sampling_setting_reaches_generate_explicitly(tokenizer):
    """transformers fills a setting left out from its defaults (top_k=50): every one is passed.
    (Greedy decoding of a Llama runs on course_lib.decoder, not transformers' generate.)"""
    model = tiny_llama(tokenizer)
    seen = []
    real = model.generate
    model.generate = lambda **kw: (seen.append(kw), real(**kw))[1]
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, do_sample=True, temperature=0.7, seed=0)
    generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2, do_sample=True, temperature=0.7, top_k=5, top_p=0.8,
             seed=0)
    picked = [{k: kw[k] for k in ("do_sample", "temperature", "top_k", "top_p")} for kw in seen]
    assert picked == [{"do_sample": True, "temperature": 0.7, "top_k": None, "top_p": None},
                      {"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.8}]


def test_on_policy_samples_are_hermetic(tokenizer):
    from course_lib.distill import sample_on_policy

    model = tiny_llama(tokenizer)
    tokenizer.padding_side = "right"
    (first, second), untouched = run_hermetic(lambda: sample_on_policy(model, tokenizer, PROMPTS, 5, seed=7))
    assert same(first, second) and untouched and tokenizer.padding_side == "right"
    tokenizer.padding_side = "left"


def test_preference_samples_are_hermetic(tokenizer):
    from course_lib.preference_data import PreferencePrompt, sample_responses

    model = tiny_llama(tokenizer)
    prompts = [PreferencePrompt("What is 1 plus 2?", "arithmetic", "3"), PreferencePrompt("Name a fruit.", "x")]
    (first, second), untouched = run_hermetic(lambda: sample_responses(model, tokenizer, prompts, n=2,
                                                                       max_new_tokens=4, seed=1))
    assert first == second and untouched


def test_training_is_hermetic(tokenizer):
    """Dropout draws random numbers during training: they come from the loop's own seeded stream."""
    from course_lib.train import lm_loss, sft_batch, train

    batches = [sft_batch(tokenizer, PROMPTS, ["Blue.", "Five.", "Hi!"], max_length=64)]

    def run():
        model = tiny_llama(tokenizer, dropout=0.5)
        result = train(model, lm_loss, batches, steps=3, lr=1e-2, seed=4, progress=False)
        return result.losses, model.state_dict()

    (first, second), untouched = run_hermetic(run)
    assert same(first, second) and untouched
    model = tiny_llama(tokenizer, dropout=0.5)
    assert train(model, lm_loss, batches, steps=3, lr=1e-2, seed=5, progress=False).losses != first[0]


def test_reward_model_training_is_hermetic():
    from course_lib.reward_model import train_reward_model

    g = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(20, 8, generator=g) + 0.3, torch.randn(20, 8, generator=g)

    def run():
        head, result = train_reward_model(chosen, rejected, steps=5, batch_size=6, seed=2)
        return result.losses, head.state_dict()

    (first, second), untouched = run_hermetic(run)
    assert same(first, second) and untouched


def test_distillation_with_on_policy_samples_is_hermetic(tokenizer):
    from course_lib.distill import distill, kd_batches, with_teacher_logits

    teacher = tiny_llama(tokenizer)
    rows = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, ["Blue.", "Five.", "Hi!"])]
    batches = [with_teacher_logits(teacher, b) for b in kd_batches(tokenizer, rows, batch_size=3, max_length=64)]

    def run():
        student = copy.deepcopy(teacher)
        result = distill(student, "on_policy_jsd", batches, steps=2, lr=1e-3, teacher=teacher, tokenizer=tokenizer,
                         prompts=PROMPTS, lmbda=1.0, max_new_tokens=4, progress=False)
        return result.losses

    (first, second), untouched = run_hermetic(run)
    assert first == second and untouched and tokenizer.padding_side == "left"


def test_a_grading_check_is_hermetic(capsys):
    from course_lib.checks import check_w8a16_forward

    reference = lambda layer, x: layer(x)
    (first, second), untouched = run_hermetic(lambda: bool(check_w8a16_forward(reference)))
    assert first and second and untouched
    capsys.readouterr()


def test_scoring_leaves_the_tokenizer_alone(tokenizer):
    from course_lib.evaluate import perplexity
    from course_lib.judge import direct_scores, judge_pairs
    from course_lib.preference_data import Pair, PreferencePrompt

    model = tiny_llama(tokenizer)
    prompt = PreferencePrompt("What is 3 plus 4?", "arithmetic", "7")
    for side in ("left", "right"):
        tokenizer.padding_side = side
        perplexity(model, tokenizer, ["A short text.", "Another, somewhat longer text to pad against."])
        judge_pairs(model, tokenizer, [Pair(prompt, "7", "It is 8.")])
        direct_scores(model, tokenizer, [prompt], ["7"])
        assert tokenizer.padding_side == side
    tokenizer.padding_side = "left"


def test_teacher_and_student_do_not_share_a_generation_config(tokenizer):
    teacher = tiny_llama(tokenizer)
    student = make_student(teacher, 1)
    assert student.generation_config is not teacher.generation_config
    student.generation_config.max_new_tokens = 3
    assert teacher.generation_config.max_new_tokens != 3
