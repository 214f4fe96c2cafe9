"""Chapter 05's feedback machinery: losses against their formulas (and TRL), the judge, the reward model,
DPO, win rates (course_lib.preference_data, judge, reward_model, dpo; course_lib.feedback is their door)."""
import copy
import math

import pytest
import torch
from torch import nn

from course_lib import feedback
from course_lib.dpo import (Preference, dpo_batch_loss, dpo_loss, kl_to_reference, preference_batches, to_preferences,
                            train_dpo)
from course_lib.judge import (JudgeVerdicts, average_orders, direct_preference, direct_scores, judge_pairs,
                              judge_prompt, labels_from_preference)
from course_lib.preference_data import Pair, PreferencePrompt, WinRate, agreement, rubric_labels, win_rate
from course_lib.reward_model import (RewardHead, best_of_n, bradley_terry_loss, response_features, reward_accuracy,
                                     train_reward_model)
from course_lib.scoring import response_logits, sequence_logprobs
from course_lib.train import add_lora

CAPITAL = PreferencePrompt("What is the capital of France?", "capital", "Paris")
SUM = PreferencePrompt("What is 3 plus 4?", "arithmetic", "7")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from course_lib.models import _prepare_tokenizer, ensure_teacher_checkpoint

    return _prepare_tokenizer(AutoTokenizer.from_pretrained(ensure_teacher_checkpoint()))


def tiny_llama(tokenizer, seed=0, layers=2):
    """A randomly initialized 2-layer Llama with the teacher's vocabulary: fast to train in a test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------- losses

def test_the_chapter_door_names_the_contracts_functions():
    assert feedback.bradley_terry_loss is bradley_terry_loss and feedback.dpo_loss is dpo_loss
    assert feedback.win_rate is win_rate


def test_bradley_terry_loss_is_the_formula():
    torch.manual_seed(0)
    r_chosen, r_rejected = torch.randn(7), torch.randn(7)
    expected = torch.stack([-torch.log(1 / (1 + torch.exp(-(c - r)))) for c, r in zip(r_chosen, r_rejected)]).mean()
    assert torch.allclose(bradley_terry_loss(r_chosen, r_rejected), expected, atol=1e-6)
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


def test_dpo_loss_is_the_formula():
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5) * 10 for _ in range(4))
    beta = 0.25
    margin = (pc - rc) - (pr - rr)
    expected = (-torch.log(torch.sigmoid(beta * margin))).mean()
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta), expected, atol=1e-5)
    # the policy equal to the reference: log 2, whatever beta
    assert dpo_loss(pc, pr, pc, pr, beta=0.7).item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


def test_dpo_loss_and_logprobs_match_trl(tmp_path, tokenizer):
    """TRL's DPOTrainer (sigmoid loss, separate reference model) gives the same loss on the same batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    policy, reference = tiny_llama(tokenizer, seed=0), tiny_llama(tokenizer, seed=1)
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    trainer = DPOTrainer(model=policy, ref_model=reference, train_dataset=dataset, processing_class=tokenizer,
                         args=DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to=[], use_cpu=True))
    examples = [{"prompt_ids": [1, 5, 9], "chosen_ids": [11, 12, 13], "rejected_ids": [14]},
                {"prompt_ids": [7, 8], "chosen_ids": [20], "rejected_ids": [21, 22]}]
    inputs = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(examples)
    policy.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, dict(inputs))
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                 "labels": inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)}
        pc, pr = sequence_logprobs(policy, batch).chunk(2)
        rc, rr = sequence_logprobs(reference, batch).chunk(2)
    assert dpo_loss(pc, pr, rc, rr, beta=0.3).item() == pytest.approx(trl_loss.item(), abs=1e-5)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """TRL's trainer leaves accelerate's process-wide state behind (CPU-only, its precision);
    reset it so that later tests' training loops start from a clean Accelerator."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_sequence_logprobs_sum_only_the_response_tokens(tokenizer):
    model = tiny_llama(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),
             "labels": torch.tensor([[-100, -100, 7, 8, -100]])}
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0]
        expected = logp[1, 7] + logp[2, 8]
        assert sequence_logprobs(model, batch).item() == pytest.approx(expected.item(), abs=1e-5)


# ----------------------------------------------------------------------------- labels

def test_rubric_annotator_flips_the_asked_fraction():
    pairs = [Pair(CAPITAL, "Paris", "It is Lyon.")] * 4000 + [Pair(CAPITAL, "Paris", "Paris")] * 500
    clean = rubric_labels(pairs)
    assert clean[:4000] == [1] * 4000 and clean[4000:] == [0] * 500
    noisy = rubric_labels(pairs, noise=0.2, seed=3)
    assert noisy[:4000].count(-1) == 800  # exactly the asked fraction of the decided pairs
    assert noisy[4000:] == [0] * 500  # ties stay ties
    assert rubric_labels(pairs, noise=0.2, seed=3) == noisy  # seeded
    assert rubric_labels(pairs, noise=0.2, seed=4) != noisy  # a random choice of which ones
    assert rubric_labels(pairs[:7], noise=0.15).count(-1) == 1  # round(0.15 x 7) = 1
    with pytest.raises(ValueError, match="noise"):
        rubric_labels(pairs, noise=1.5)


def test_labels_agreement_and_preferences_count_ties():
    pairs = [Pair(SUM, "7", "8"), Pair(SUM, "8", "8"), Pair(SUM, "9", "7"), Pair(SUM, "6", "5")]
    labels = labels_from_preference(pairs, torch.tensor([0.9, 0.8, 0.2, 0.5]))
    assert labels == [1, 0, -1, 0]  # identical responses and exactly 1/2: ties
    assert agreement(labels, [1, 1, 1, -1]) == (1, 2)
    kept, ties = to_preferences(pairs, labels)
    assert ties == 2 and kept == [Preference(SUM, "7", "8"), Preference(SUM, "7", "9")]
    with pytest.raises(ValueError, match="one label per pair"):
        to_preferences(pairs, labels[:3])
    with pytest.raises(ValueError, match=r"\+1 \(first\)"):
        to_preferences(pairs, [1, 2, 0, 0])


class _FixedNextToken(nn.Module):
    """A stand-in judge whose next-token distribution is the same for every prompt."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # so that the judge has a device
        self.register_buffer("log_probs", probs.log())

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0):
        class Out:
            logits = self.log_probs.expand(*input_ids.shape, -1)[:, -logits_to_keep:]
        return Out()


def _letter_probs(tokenizer, p_a, p_b, rest_token=None):
    probs = torch.full((len(tokenizer),), 1e-12)
    a, b = (tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" A", " B"))
    probs[a], probs[b] = p_a, p_b
    if rest_token is not None:
        probs[rest_token] = 1 - p_a - p_b
    return probs / probs.sum()


def test_a_judge_that_always_says_a_is_all_position_bias(tokenizer):
    judge = _FixedNextToken(_letter_probs(tokenizer, 0.8, 0.2))
    pairs = [Pair(SUM, "7", "8"), Pair(SUM, "8", "7"), Pair(SUM, "7", "7")]
    verdicts = judge_pairs(judge, tokenizer, pairs)
    assert torch.allclose(verdicts.p_a, torch.tensor(0.8)) and torch.allclose(verdicts.p_a_swapped, torch.tensor(0.8))
    assert torch.allclose(verdicts.p_first, torch.tensor(0.5))  # averaged: no preference left
    assert verdicts.position_bias() == (2, 2)  # the identical pair is not counted
    assert verdicts.share_slot_a() == 1.0 and verdicts.abstained == 0
    assert labels_from_preference(pairs, verdicts.p_first) == [0, 0, 0]


def test_a_judge_that_answers_neither_letter_is_counted_as_abstaining(tokenizer):
    other = tokenizer(" The", add_special_tokens=False).input_ids[0]
    judge = _FixedNextToken(_letter_probs(tokenizer, 0.03, 0.01, rest_token=other))
    verdicts = judge_pairs(judge, tokenizer, [Pair(SUM, "7", "8"), Pair(SUM, "8", "9")])
    assert verdicts.abstained == 4  # both orders of both pairs
    assert verdicts.letter_mass == pytest.approx(0.04, abs=1e-4)
    assert torch.allclose(verdicts.p_a, torch.tensor(0.75))  # still read, normalized
    with pytest.raises(ValueError, match="empty"):
        judge_pairs(judge, tokenizer, [])


def test_the_judge_reads_letters_far_below_every_other_token(tokenizer):
    """Probabilities of 1e-300 underflow to 0 in float32 (0/0 = NaN before); logits do not."""
    logits = torch.zeros(len(tokenizer))
    a, b = (tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" A", " B"))
    logits[a], logits[b] = -800.0, -801.0
    judge = _FixedNextToken(torch.ones(len(tokenizer)))
    judge.log_probs.copy_(logits)
    verdicts = judge_pairs(judge, tokenizer, [Pair(SUM, "7", "8")])
    assert torch.allclose(verdicts.p_a, torch.sigmoid(torch.tensor(1.0)))
    assert verdicts.abstained == 2 and verdicts.letter_mass == 0.0
    assert verdicts.p_first.item() == pytest.approx(0.5)  # a judge that always says A: no preference
    yes, no = (tokenizer(t, add_special_tokens=False).input_ids[0] for t in ("Yes", "No"))
    logits[yes], logits[no] = -900.0, -903.0
    judge.log_probs.copy_(logits)
    assert torch.allclose(direct_scores(judge, tokenizer, [SUM], ["7"]), torch.sigmoid(torch.tensor(3.0)))


def test_the_real_judge_averages_both_orders(teacher):
    model, tokenizer = teacher
    pair = Pair(CAPITAL, "Paris.", "The capital of France is Lyon, a big city.")
    swapped = Pair(CAPITAL, pair.second, pair.first)
    verdicts = judge_pairs(model, tokenizer, [pair, swapped, Pair(CAPITAL, "", "")], batch_size=1)
    # judging (x, y) in both orders is judging (y, x) in both orders: the averages are complementary
    assert verdicts.p_first[0].item() == pytest.approx(1 - verdicts.p_first[1].item(), abs=1e-4)
    assert verdicts.p_a[0].item() == pytest.approx(verdicts.p_a_swapped[1].item(), abs=1e-4)
    assert verdicts.p_first[2].item() == pytest.approx(0.5, abs=1e-6)  # identical (empty) responses
    assert "(no response)" in judge_prompt(CAPITAL, "", "Paris")
    direct = direct_preference(model, tokenizer, [pair, swapped], batch_size=1)
    assert direct[0].item() == pytest.approx(1 - direct[1].item(), abs=1e-4)


# ----------------------------------------------------------------------------- reward model

def test_reward_features_do_not_depend_on_batch_padding(teacher):
    model, tokenizer = teacher
    prompts, responses = [CAPITAL, SUM], ["Paris.", "It is seven, because three plus four makes seven."]
    together = response_features(model, tokenizer, prompts, responses, batch_size=2)
    alone = torch.cat([response_features(model, tokenizer, [p], [r]) for p, r in zip(prompts, responses)])
    assert together.shape == (2, model.config.hidden_size)
    assert torch.allclose(together, alone, atol=1e-3)


def test_reward_model_learns_a_separable_preference():
    torch.manual_seed(0)
    direction = torch.randn(16)
    chosen, rejected = torch.randn(64, 16) + 0.5 * direction, torch.randn(64, 16) - 0.5 * direction
    head, result = train_reward_model(chosen[:48], rejected[:48], steps=60, lr=0.05)
    assert isinstance(head, RewardHead) and result.losses[-1] < result.losses[0]
    right, n = reward_accuracy(head, chosen[48:], rejected[48:])
    assert n == 16 and right >= 14
    with pytest.raises(ValueError, match="same shape|one shape"):
        train_reward_model(chosen, rejected[:3])


def test_best_of_n_takes_the_highest_reward():
    assert best_of_n([["a", "b", "c"], ["d", "e", "f"]], torch.tensor([[0, 2, 1], [5, 0, 0]])) == ["b", "d"]
    with pytest.raises(ValueError, match="prompts"):
        best_of_n([["a", "b"]], torch.zeros(1, 3))


# ----------------------------------------------------------------------------- DPO and win rates

def test_a_dpo_step_raises_the_chosen_log_ratio(tokenizer):
    base = tiny_llama(tokenizer, layers=3)
    policy = add_lora(base, r=4, alpha=8, layers=[1, 2])  # the top two layers only
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in policy.named_parameters() if p.requires_grad}
    assert adapted == {"1", "2"}
    preferences = [Preference(CAPITAL, "Paris.", "Lyon is the capital."),
                   Preference(SUM, "7", "It is 8.")]
    batch = preference_batches(tokenizer, preferences, batch_size=2)[0]

    def margin():  # (log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)
        with torch.no_grad():
            pc, pr = sequence_logprobs(policy, batch).chunk(2)
            with policy.disable_adapter():
                rc, rr = sequence_logprobs(policy, batch).chunk(2)
        return ((pc - rc) - (pr - rr)).mean().item()

    assert margin() == pytest.approx(0.0, abs=1e-5)  # LoRA starts as the identity
    prompts, chosen = [p.prompt for p in preferences], [p.chosen for p in preferences]
    assert kl_to_reference(policy, tokenizer, prompts, chosen) == pytest.approx(0.0, abs=1e-6)
    result = train_dpo(policy, tokenizer, preferences, steps=3, batch_size=2, lr=1e-2, progress=False)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert margin() > 0.0
    assert kl_to_reference(policy, tokenizer, prompts, chosen) > 0.0
    with pytest.raises(TypeError, match="peft"):
        train_dpo(copy.deepcopy(tiny_llama(tokenizer)), tokenizer, preferences, steps=1)
    with pytest.raises(ValueError, match="empty"):
        preference_batches(tokenizer, [])


def test_rpo_adds_the_chosen_answers_mean_token_nll(tokenizer):
    """nll_weight = RPO's alpha: DPO loss + alpha * mean NLL of the chosen tokens (TRL's rpo_alpha)."""
    base = tiny_llama(tokenizer, layers=2)
    preferences = [Preference(CAPITAL, "Paris.", "Lyon is the capital."), Preference(SUM, "7", "It is 8.")]
    batch = preference_batches(tokenizer, preferences, batch_size=2)[0]
    with torch.no_grad():
        batch["ref_logps"] = sequence_logprobs(tiny_llama(tokenizer, layers=2, seed=1), batch)
        dpo = dpo_batch_loss(base, batch, beta=0.2)
        rpo = dpo_batch_loss(base, batch, beta=0.2, nll_weight=0.5)
        chosen = {k: v[:2] for k, v in batch.items() if k != "ref_logps"}
        logits, targets = response_logits(base, chosen)
    nll = torch.nn.functional.cross_entropy(logits, targets)
    assert rpo.item() == pytest.approx(dpo.item() + 0.5 * nll.item(), abs=1e-5)


def test_train_dpo_keeps_each_term_of_each_step(tokenizer):
    """The plot of chapter 05 reads the DPO term, the NLL term, the preference accuracy and the
    reward margin apart; together they make the loss the loop minimized, step by step."""
    policy = add_lora(tiny_llama(tokenizer, layers=2), r=4, alpha=8)
    preferences = [Preference(CAPITAL, "Paris.", "Lyon is the capital."), Preference(SUM, "7", "It is 8."),
                   Preference(SUM, "Seven.", "8"), Preference(CAPITAL, "Paris", "")]
    result = train_dpo(policy, tokenizer, preferences, steps=3, batch_size=1, lr=1e-2, nll_weight=0.5,
                       grad_accum=2, progress=False)
    assert len(result.dpo) == len(result.nll) == len(result.accuracy) == len(result.margin) == result.steps == 3
    assert result.dpo[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference
    assert result.margin[0] == pytest.approx(0.0, abs=1e-6) and result.accuracy[0] == 0.0
    for loss, dpo, nll in zip(result.losses, result.dpo, result.nll):
        assert loss == pytest.approx(dpo + 0.5 * nll, rel=1e-5)
    assert all(0.0 <= a <= 1.0 for a in result.accuracy) and all(n > 0 for n in result.nll)
    assert result.margin[-1] > 0  # a few steps at this rate raise the chosen answers' log-ratios


def test_win_rate_counts_and_interval():
    prompts = [CAPITAL, CAPITAL, CAPITAL, SUM]
    result = win_rate(prompts, ["Paris", "Paris", "Lyon", "7"], ["Lyon", "Paris", "Paris", "8"])
    assert (result.wins, result.losses, result.ties, result.n) == (2, 1, 1, 4)
    assert result.rate == pytest.approx(2 / 3)
    low, high = result.interval
    assert low < 2 / 3 < high
    assert math.isnan(WinRate(0, 0, 3).rate) and WinRate(0, 0, 3).interval == (0.0, 1.0)
    assert str(WinRate(0, 0, 3)) == "– (all ties) (0 wins, 0 losses, 3 ties of 3)"
    assert WinRate(3, 1, 0).rate_text.startswith("75% [")
    with pytest.raises(ValueError, match="one candidate"):
        win_rate(prompts, ["Paris"], ["Lyon"])


def test_agreement_needs_equal_lengths():
    with pytest.raises(ValueError, match="equally many"):
        agreement([1, -1], [1])
    verdicts = JudgeVerdicts(torch.tensor([0.9, 0.3]), torch.tensor([0.8, 0.6]), 0, 1.0,
                             torch.tensor([False, False]))
    assert verdicts.position_bias() == (1, 2)  # pair 0 picks slot A twice; pair 1 picks the second both times
    assert verdicts.share_slot_a() == pytest.approx(0.75)
    assert torch.allclose(average_orders(torch.tensor([0.9, 0.3]), torch.tensor([0.8, 0.6])),
                          torch.tensor([0.55, 0.35]))


def test_chapter_05_checks_pass_the_reference_and_explain_mistakes(capsys, monkeypatch):
    from course_lib import checks

    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    assert checks.check_bradley_terry_loss(bradley_terry_loss)
    assert checks.check_dpo_loss(dpo_loss)
    assert checks.check_average_orders(average_orders)
    capsys.readouterr()
    assert not checks.check_bradley_terry_loss(lambda c, r: -torch.log(torch.sigmoid(c - r)).mean())
    assert "logsigmoid" in capsys.readouterr().out
    assert not checks.check_dpo_loss(lambda pc, pr, rc, rr, beta=0.1: dpo_loss(pc, pr, rc, rr, 0.1))
    assert "beta" in capsys.readouterr().out
    assert not checks.check_average_orders(lambda a, b: (a + b) / 2)
    assert "1 − P(A)" in capsys.readouterr().out
