"""Bad input across the public API gets a clear error, never a NaN or a bare traceback.

One table: each case is (what the student did, the call, the error type, words its message must
contain). The calls run on a tiny random Llama with the teacher's tokenizer, so the table is fast.
README.md's troubleshooting lists the messages a student could meet.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from course_lib import distill, dpo, evaluate, gguf_blocks, judge, models, preference_data, quant, reward_model, train
from course_lib.int8_inference import Int4Linear, Int8Linear, quantize_model
from course_lib.runtime import seeded

SUM = preference_data.PreferencePrompt("What is 3 plus 4?", "arithmetic", "7")


@pytest.fixture(scope="module")
def ctx():
    """The objects the calls need: a tokenizer, a tiny model, a LoRA policy, batches good and bad."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = models._prepare_tokenizer(AutoTokenizer.from_pretrained(models.ensure_teacher_checkpoint()))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    with seeded(0):
        model = LlamaForCausalLM(config).eval()
        policy = train.add_lora(LlamaForCausalLM(config).eval(), r=2, alpha=4)
    good = train.sft_batch(tok, ["Name a colour.", "Add 2 and 2."], ["Blue.", "Two and two make four."], max_length=64)
    unlabelled = {**good, "labels": torch.full_like(good["labels"], -100)}
    left_padded = {k: v.flip(1) for k, v in good.items()}
    return SimpleNamespace(tok=tok, model=model, policy=policy, good=good, unlabelled=unlabelled,
                           left_padded=left_padded)


class SplitWords:
    """A tokenizer that splits every word into two tokens: no single-token verdict."""

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[5, 6])


class OneToken:
    """A tokenizer that maps everything to the same token: verdicts that cannot be told apart."""
    unk_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[7])


Q, SCALE = quant.absmax_quantize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)

CASES = [
    # training and the losses
    ("lm_loss on a batch whose labels are all -100", lambda c: train.lm_loss(c.model, c.unlabelled),
     ValueError, ["no label token", "-100"]),
    ("training on batches without any label", lambda c: train.train(c.model, train.lm_loss, [c.unlabelled], steps=1,
                                                                    progress=False),
     ValueError, ["nothing to average over"]),
    ("sft_batch whose max_length cuts the whole response away",
     lambda c: train.sft_batch(c.tok, ["Name a colour."], ["Blue."], max_length=10),
     ValueError, ["max_length=10", "no room for its response"]),
    ("sft_batch with fewer responses than prompts", lambda c: train.sft_batch(c.tok, ["a", "b"], ["x"]),
     ValueError, ["equally many prompts and responses"]),
    ("train for zero steps", lambda c: train.train(c.model, train.lm_loss, [c.good], steps=0, progress=False),
     ValueError, ["steps", "at least 1"]),
    ("train on an empty list of batches", lambda c: train.train(c.model, train.lm_loss, [], steps=1, progress=False),
     ValueError, ["batches is empty"]),
    ("accumulation given to the Accelerator instead of train",
     lambda c: train.train(c.model, train.lm_loss, [c.good], steps=1, progress=False,
                           accelerator=__import__("accelerate").Accelerator(gradient_accumulation_steps=2)),
     ValueError, ["grad_accum", "gradient_accumulation_steps=2"]),
    ("LoRA on a layer the model does not have", lambda c: train.add_lora(c.model, layers=[5]),
     ValueError, ["layers", "0..1"]),
    ("a left-padded batch where the course scores right-padded ones", lambda c: train.lm_loss(c.model, c.left_padded),
     ValueError, ["left-padded", "right-padded"]),
    # distillation
    ("distill with no batches", lambda c: distill.distill(c.model, "forward_kl", [], steps=1),
     ValueError, ["batches", "non-empty"]),
    ("distill by an unknown method", lambda c: distill.distill(c.model, "kl", [c.good], steps=1),
     ValueError, ["method", "forward_kl"]),
    ("response metrics of batches without labels",
     lambda c: distill.response_metrics(c.model, [{**c.unlabelled, "teacher_logits": torch.zeros(0, 1)}]),
     ValueError, ["no label token"]),
    ("response metrics of no batches", lambda c: distill.response_metrics(c.model, []),
     ValueError, ["non-empty"]),
    ("a KD loss without teacher logits", lambda c: distill.token_kd_loss("forward_kl")(c.model, c.good),
     ValueError, ["teacher_logits", "with_teacher_logits"]),
    ("top-k teacher batches at another temperature",
     lambda c: distill.distill(c.model, "forward_kl", [distill.with_teacher_logits(c.model, c.good, top_k=4)],
                               steps=1, temperature=2.0),
     ValueError, ["top-k", "temperature", "with_teacher_logits without top_k"]),
    ("a top_k of zero for the teacher's logits", lambda c: distill.with_teacher_logits(c.model, c.good, top_k=0),
     ValueError, ["top_k", "int in 1.."]),
    ("texts for batches that are not packed",
     lambda c: distill.kd_batches(c.tok, [{"prompt": "Hi.", "response": "Hello."}], texts=["Some text."]),
     ValueError, ["texts", "row_length"]),
    ("packed rows shorter than an example",
     lambda c: train.packed_batches(c.tok, ["Hi."], ["Hello."], max_length=64, row_length=32),
     ValueError, ["row_length", ">= max_length"]),
    ("on-policy samples for no prompts", lambda c: distill.sample_on_policy(c.model, c.tok, []),
     ValueError, ["prompts", "non-empty"]),
    # generation
    ("top_k without sampling", lambda c: models.generate(c.model, c.tok, ["Hi."], top_k=5),
     ValueError, ["top_k", "do_sample=True"]),
    ("top_k of zero", lambda c: models.generate(c.model, c.tok, ["Hi."], do_sample=True, top_k=0),
     ValueError, ["top_k", ">= 1"]),
    ("top_p above one", lambda c: models.generate(c.model, c.tok, ["Hi."], do_sample=True, top_p=1.5),
     ValueError, ["top_p", "(0, 1]"]),
    ("sampling at temperature zero", lambda c: models.generate(c.model, c.tok, ["Hi."], do_sample=True, temperature=0),
     ValueError, ["temperature", "> 0"]),
    ("a bare string as prompts", lambda c: models.generate(c.model, c.tok, "Hi."),
     TypeError, ["list of strings", "[prompt]"]),
    ("a negative seed", lambda c: models.generate(c.model, c.tok, ["Hi."], do_sample=True, seed=-1),
     ValueError, ["seed", "non-negative"]),
    # measuring
    ("perplexity of texts with nothing to predict", lambda c: evaluate.perplexity(c.model, c.tok, ["", ""]),
     ValueError, ["no token to predict", "two tokens"]),
    ("perplexity of a bare string", lambda c: evaluate.perplexity(c.model, c.tok, "some text"),
     ValueError, ["non-empty list of strings"]),
    # the judge
    ("a judge whose tokenizer splits ' A' in two",
     lambda c: judge.judge_pairs(c.model, SplitWords(), [preference_data.Pair(SUM, "7", "8")]),
     ValueError, ["' A' is 2 tokens", "single token"]),
    ("a judge whose letters are one and the same token",
     lambda c: judge.judge_pairs(c.model, OneToken(), [preference_data.Pair(SUM, "7", "8")]),
     ValueError, ["distinct tokens"]),
    ("direct scores when 'Yes' is not one token", lambda c: judge.direct_scores(c.model, SplitWords(), [SUM], ["7"]),
     ValueError, ["'Yes' is 2 tokens"]),
    ("labels from a NaN preference",
     lambda c: judge.labels_from_preference([preference_data.Pair(SUM, "7", "8")], torch.tensor([float("nan")])),
     ValueError, ["NaN", "probability"]),
    ("judging no pairs", lambda c: judge.judge_pairs(c.model, c.tok, []), ValueError, ["pairs is empty"]),
    # reward model and DPO
    ("reward features whose max_length leaves no response",
     lambda c: reward_model.response_features(c.model, c.tok, [SUM], ["7"], max_length=8),
     ValueError, ["max_length=8", "no room for its response"]),
    ("a reward model on pairs of different shapes",
     lambda c: reward_model.train_reward_model(torch.zeros(4, 3), torch.zeros(2, 3)),
     ValueError, ["one shape"]),
    ("KL to the reference of no responses", lambda c: dpo.kl_to_reference(c.policy, c.tok, [], []),
     ValueError, ["one response per prompt"]),
    ("KL to the reference of a model without adapters",
     lambda c: dpo.kl_to_reference(c.model, c.tok, [SUM], ["7"]), TypeError, ["peft", "add_lora"]),
    ("DPO on no preferences", lambda c: dpo.train_dpo(c.policy, c.tok, [], steps=1),
     ValueError, ["preferences is empty"]),
    ("DPO with beta zero", lambda c: dpo.dpo_loss(*torch.zeros(4, 2), beta=0.0), ValueError, ["beta", "> 0"]),
    ("labels that are not +1, -1, 0",
     lambda c: dpo.to_preferences([preference_data.Pair(SUM, "7", "8")], [2]), ValueError, ["+1 (first)"]),
    # quantization
    ("dequantize with a scale from another tensor", lambda c: quant.dequantize(Q, torch.ones(3, 1)),
     ValueError, ["scale of shape (3, 1)", "does not fit q of shape (4, 8)"]),
    ("dequantize with a per-group scale that divides nothing", lambda c: quant.dequantize(Q, torch.ones(4, 3)),
     ValueError, ["scale of shape (4, 3)", "group_size"]),
    ("dequantize with a zero point that does not fit",
     lambda c: quant.dequantize(Q, SCALE, torch.zeros(5, dtype=torch.int32)),
     ValueError, ["zero_point of shape (5,)", "does not fit"]),
    ("relative error against an all-zero reference", lambda c: quant.relative_error(torch.zeros(3), torch.ones(3)),
     ValueError, ["all zeros", "undefined"]),
    ("relative error of tensors of different shapes", lambda c: quant.relative_error(torch.ones(3), torch.ones(4)),
     ValueError, ["same shape"]),
    ("quantizing to one bit", lambda c: quant.absmax_quantize(torch.ones(4), bits=1),
     ValueError, ["bits", "between 2 and 8"]),
    ("a group size that does not divide the row", lambda c: quant.absmax_quantize(torch.ones(2, 6), group_size=4),
     ValueError, ["group_size=4", "divisor of 6"]),
    ("a GGUF tensor the file does not have",
     lambda c: gguf_blocks.read_gguf_tensor(models.teacher_gguf_path(), "no.such.weight"),
     KeyError, ["has no tensor 'no.such.weight'"]),
    ("GGUF blocks of an unknown format",
     lambda c: gguf_blocks.decode_gguf_blocks(torch.zeros(34, dtype=torch.uint8), "Q5_K"),
     ValueError, ["qtype", "Q8_0"]),
    # INT8 and 4-bit layers, and the speed measurements
    ("4-bit groups of size 0", lambda c: Int4Linear.from_float(nn.Linear(64, 8), group_size=0),
     ValueError, ["group_size"]),
    ("4-bit groups of a negative size", lambda c: Int4Linear.from_float(nn.Linear(64, 8), group_size=-32),
     ValueError, ["group_size"]),
    ("4-bit groups that do not divide the row", lambda c: Int4Linear.from_float(nn.Linear(64, 8), group_size=24),
     ValueError, ["divides in_features"]),
    ("4-bit groups of an odd size", lambda c: Int4Linear(64, 8, group_size=3), ValueError, ["even"]),
    ("an outlier threshold with 4-bit weights",
     lambda c: quantize_model(copy.deepcopy(c.model), "w4a16", outlier_threshold=6.0), ValueError, ["outlier_threshold"]),
    ("a per-tensor scale with 4-bit weights",
     lambda c: quantize_model(copy.deepcopy(c.model), "w4a16", granularity="tensor"), ValueError, ["granularity"]),
    ("an outlier threshold without INT8 activations",
     lambda c: quantize_model(copy.deepcopy(c.model), "w8a16", outlier_threshold=6.0), ValueError, ["w8a8"]),
    ("a group size with INT8 weights", lambda c: quantize_model(copy.deepcopy(c.model), "w8a8", group_size=32),
     ValueError, ["group_size"]),
    ("4-bit groups of size 0 for a whole model", lambda c: quantize_model(copy.deepcopy(c.model), "w4a16", group_size=0),
     ValueError, ["group_size"]),
    ("a quantization mode that does not exist", lambda c: quantize_model(copy.deepcopy(c.model), "int3"),
     ValueError, ["mode"]),
    ("an outlier threshold on a W8A16 layer",
     lambda c: Int8Linear.from_float(nn.Linear(64, 8), "w8a16", outlier_threshold=6.0), ValueError, ["outlier_threshold"]),
    ("quantizing a layer that is not nn.Linear", lambda c: Int8Linear.from_float(nn.Conv1d(2, 2, 1)),
     TypeError, ["nn.Linear"]),
    ("timing zero decode steps", lambda c: evaluate.decode_timing(c.model, torch.zeros(2, 4, dtype=torch.long), steps=0),
     ValueError, ["steps"]),
    ("timing a prefill of a flat tensor", lambda c: evaluate.prefill_timing(c.model, torch.zeros(4)),
     ValueError, ["input_ids"]),
]


@pytest.mark.parametrize("what, call, error, words", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gets_a_clear_error(ctx, what, call, error, words):
    with pytest.raises(error) as raised:
        call(ctx)
    message = str(raised.value)
    for word in words:
        assert word in message, f"{what}: {word!r} not in {message!r}"
