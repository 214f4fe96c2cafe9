"""course_lib.train: the shared loop (loss goes down, LoRA, token-weighted accumulation, 2 processes with
accumulation and their own data, GPU precision settings restored) and SFT labels."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from course_lib import train as train_module
from course_lib.train import (add_lora, autocast_for, label_tokens, lm_loss, packed_batches, response_labels,
                              sft_batch, sft_batches, tf32_matmuls, train)


def tiny_llama(seed: int = 0):
    """A 2-layer Llama with a 64-token vocabulary: the loop's mechanics without the cost."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def tiny_batches(n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": response_labels(ids, [3, 5, 2, 4], mask)})
    return out


def uneven_batches():
    """Four batches whose label-token counts differ a lot (8, 44, 32, 14): the weighting shows."""
    g = torch.Generator().manual_seed(7)
    out = []
    for prompts in ([10, 10, 10, 10], [1, 1, 1, 1], [2, 5, 8, 1], [9, 8, 9, 8]):
        ids = torch.randint(0, 64, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": response_labels(ids, prompts, mask)})
    return out


def sgd_step_by_hand(model, batches, lr):
    """One SGD step on the mean next-token loss over ALL label tokens of `batches` (one big batch)."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        total = total + torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                          ignore_index=-100, reduction="sum")
        count += label_tokens(batch)
    (total / count).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def use_plain_sgd(monkeypatch):
    """The loop's AdamW swapped for plain SGD: a step is then lr × the gradient itself, so comparing
    weights compares whole gradients (Adam's first step only shows their signs)."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))


@pytest.fixture
def plain_sgd(monkeypatch):
    use_plain_sgd(monkeypatch)


def test_response_labels_mask_prompt_and_padding():
    ids = torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 4, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    labels = response_labels(ids, [2, 3], mask)
    assert labels.tolist() == [[-100, -100, 7, 8, -100], [-100, -100, -100, 4, 9]]
    with pytest.raises(ValueError, match="prompt lengths"):
        response_labels(ids, [2], mask)


def test_sft_batch_learns_only_the_response(teacher):
    _, tok = teacher
    prompts, responses = ["What is 2 plus 2?", "Name a colour."], ["2 plus 2 is 4.", "Blue."]
    batch = sft_batch(tok, prompts, responses, max_length=96)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        learned = batch["input_ids"][row][batch["labels"][row] != -100]
        assert tok.decode(learned) == response + tok.eos_token  # the reply and its end-of-turn, nothing else
        kept = batch["input_ids"][row][batch["attention_mask"][row] == 1]
        assert prompt in tok.decode(kept)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


PAIRS = (["What is 2 plus 2?", "Name a colour.", "Say hello in French.", "Write one word about the sea.",
          "Is ice cold?"],
         ["2 plus 2 is 4.", "Blue.", "Bonjour, which means hello.", "Waves.", "Yes, ice is cold: it is frozen water."])


def test_packed_rows_score_each_example_as_alone(teacher):
    """Several examples to a row, kept apart by their position ids: the same label tokens, and the
    same logits at them, as one example per padded row (no attention across a boundary)."""
    from course_lib.scoring import response_logits

    model, tok = teacher
    padded = sft_batches(tok, *PAIRS, batch_size=5, max_length=96)[0]
    packed = packed_batches(tok, *PAIRS, batch_size=2, max_length=96, row_length=128)
    assert sum(len(b["input_ids"]) for b in packed) < 5  # fewer, fuller rows
    assert sum(label_tokens(b) for b in packed) == label_tokens(padded)
    assert all(b["input_ids"].shape[1] <= 128 for b in packed)
    with torch.no_grad():
        alone, _ = response_logits(model, padded)
        together = [response_logits(model, b) for b in packed]
    # the packed rows hold the examples in another order: match them by their label sequences
    def by_example(logits, batch):
        out, at = {}, 0
        for r, row in enumerate(batch["labels"][:, 1:]):
            positions = batch.get("position_ids", torch.arange(row.shape[0] + 1).repeat(len(batch["labels"]), 1))[r]
            starts = (positions == 0).nonzero().flatten().tolist() + [len(row) + 1]
            for start, end in zip(starts, starts[1:]):
                labels = row[start:end - 1][row[start:end - 1] != -100]
                if len(labels):
                    out[tuple(labels.tolist())] = logits[at:at + len(labels)]
                    at += len(labels)
        return out
    expected = by_example(alone, padded)
    got = {}
    for (logits, _), batch in zip(together, packed):
        got.update(by_example(logits, batch))
    assert expected.keys() == got.keys() and len(got) == 5
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=2e-3)
    with pytest.raises(ValueError, match="row_length"):
        packed_batches(tok, *PAIRS, max_length=96, row_length=64)


def test_plain_texts_join_packed_rows_with_every_token_but_the_first_learned(teacher):
    _, tok = teacher
    texts = ["The quick brown fox jumps over the lazy dog.", "Water boils at one hundred degrees."]
    alone = packed_batches(tok, *PAIRS, batch_size=8, max_length=96, row_length=256)
    both = packed_batches(tok, *PAIRS, batch_size=8, max_length=96, row_length=256, texts=texts)
    text_tokens = sum(len(tok(t).input_ids) - 1 for t in texts)  # the first token has nothing before it
    assert sum(label_tokens(b) for b in both) == sum(label_tokens(b) for b in alone) + text_tokens
    starts = both[0]["position_ids"] == 0
    assert (both[0]["labels"][starts] == -100).all()  # no sequence's first token is predicted across a boundary
    with pytest.raises(ValueError, match="two tokens"):
        packed_batches(tok, *PAIRS, max_length=96, texts=[""])


def test_train_reduces_loss_on_a_tiny_batch():
    model = tiny_llama()
    before = lm_loss(model, tiny_batches(1)[0]).item()
    result = train(model, lm_loss, tiny_batches(1), steps=40, lr=1e-2, progress=False)
    assert result.steps == 40 and len(result.losses) == 40 and result.seconds > 0
    assert result.units == 40 * label_tokens(tiny_batches(1)[0])  # what it learned from, for throughput
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert lm_loss(model, tiny_batches(1)[0]).item() < 0.5 * before
    assert not model.training


def test_train_is_seeded():
    runs = []
    for _ in range(2):
        model = tiny_llama()
        runs.append(train(model, lm_loss, tiny_batches(2), steps=3, lr=1e-3, progress=False).losses)
    assert runs[0] == runs[1]


def test_grad_accum_weights_micro_batches_by_label_tokens(plain_sgd):
    """Four uneven micro-batches accumulated = one step on the mean over all their label tokens,
    not the mean of the four per-batch means (which would give a token of the 8-token batch 5.5 times
    the weight of a token of the 44-token batch)."""
    batches = uneven_batches()
    assert [label_tokens(b) for b in batches] == [8, 44, 32, 14]
    accumulated = tiny_llama()
    result = train(accumulated, lm_loss, batches, steps=1, lr=0.5, grad_accum=4, max_grad_norm=None, progress=False)
    by_hand = tiny_llama()
    sgd_step_by_hand(by_hand, batches, lr=0.5)
    for (name, a), b in zip(accumulated.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    means = [lm_loss(tiny_llama(), b).item() for b in batches]
    assert result.losses[0] == pytest.approx(sum(m * n for m, n in zip(means, [8, 44, 32, 14])) / 98, rel=1e-5)
    mean_of_means = tiny_llama()  # what dividing by the number of micro-batches would give: not this
    (sum(lm_loss(mean_of_means, b) for b in batches) / 4).backward()
    with torch.no_grad():
        step = mean_of_means.lm_head.weight - 0.5 * mean_of_means.lm_head.weight.grad
    assert not torch.allclose(step, accumulated.lm_head.weight, rtol=1e-5, atol=1e-6)
    assert len(result.grad_norms) == 1 and result.grad_norms[0] > 0


def test_gpu_precision_settings_are_restored():
    before = torch.get_float32_matmul_precision()
    with tf32_matmuls(torch.device("cuda")):  # only flips a setting: runs without a GPU too
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with tf32_matmuls(torch.device("cpu")):
        assert torch.get_float32_matmul_precision() == before  # a CPU trains in plain float32


@pytest.mark.parametrize("hardware", [True, False])
def test_cpu_bfloat16_autocasts_only_where_asked_and_the_cpu_has_it(monkeypatch, hardware):
    monkeypatch.setattr(train_module, "cpu_has_bf16_matmul", lambda: hardware)
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with autocast_for(torch.device("cpu")):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32  # not asked: float32
    with autocast_for(torch.device("cpu"), cpu_bfloat16=True):
        assert torch.nn.functional.linear(x, w).dtype == (torch.bfloat16 if hardware else torch.float32)


def test_cpu_bfloat16_training_keeps_float32_weights_and_follows_float32(monkeypatch):
    """Mixed precision: the matmuls in bfloat16, the weights and their updates in float32; on a tiny
    model the loss curve stays within 2 % of the float32 one (emulated where the CPU lacks it)."""
    monkeypatch.setattr(train_module, "cpu_has_bf16_matmul", lambda: True)
    runs = {}
    for bf16 in (False, True):
        model = tiny_llama()
        runs[bf16] = train(model, lm_loss, tiny_batches(), steps=6, lr=1e-2, progress=False, cpu_bfloat16=bf16)
        assert all(p.dtype == torch.float32 for p in model.parameters())
    full, mixed = runs[False].losses, runs[True].losses
    assert mixed != full  # it did compute in bfloat16
    assert mixed[-1] < mixed[0] - 0.1  # and it learns
    assert all(abs(m - f) < 0.02 * f for m, f in zip(mixed, full))
    with pytest.raises(ValueError, match="cpu_bfloat16"):
        train(tiny_llama(), lm_loss, tiny_batches(), steps=1, progress=False, cpu_bfloat16="yes")


def test_warmup_ramps_the_learning_rate():
    """Adam's first update moves every weight by the learning rate itself: lr / (warmup + 1) here."""
    before = tiny_llama()
    for warmup in (0, 3):
        model = tiny_llama()
        train(model, lm_loss, tiny_batches(1), steps=1, lr=1e-2, warmup_steps=warmup, max_grad_norm=None,
              progress=False)
        step = (model.lm_head.weight - before.lm_head.weight).abs()
        torch.testing.assert_close(step.max(), torch.tensor(1e-2 / (warmup + 1)), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="warmup"):
        train(tiny_llama(), lm_loss, tiny_batches(1), steps=1, warmup_steps=-1, progress=False)


def test_lora_trains_only_the_adapters():
    model = add_lora(tiny_llama(), r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = train(model, lm_loss, tiny_batches(1), steps=10, lr=1e-2, progress=False)
    assert result.losses[-1] < result.losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_train_rejects_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="steps"):
        train(model, lm_loss, tiny_batches(1), steps=0, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train(model, lm_loss, [], steps=1, progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        train(model, lm_loss, tiny_batches(1), steps=1, progress=False)


WORKER = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from test_train import tiny_llama, tiny_batches, uneven_batches
    from accelerate import Accelerator, PartialState
    from course_lib.train import lm_loss, train

    rank = int(os.environ["RANK"])
    hooks = []  # one entry per gradient bucket all-reduced: counts the synchronizations
    prepare = Accelerator.prepare

    def counting_prepare(self, *objects):
        out = prepare(self, *objects)
        def allreduce(state, bucket):
            hooks.append(bucket.index())
            fut = torch.distributed.all_reduce(bucket.buffer().div_(self.num_processes), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])
        out[0].register_comm_hook(None, allreduce)
        return out

    Accelerator.prepare = counting_prepare
    for case in sys.argv[1:]:  # one launch for every case: starting the processes is most of the time
        hooks.clear()
        model = tiny_llama(seed=rank)  # different on purpose: DDP starts every replica from rank 0's
        if case == "plain":
            result = train(model, lm_loss, tiny_batches(2), steps=1, lr=1e-2, max_grad_norm=None, progress=False)
        else:  # two steps of two micro-batches: rank 0 takes batches 0 and 2, rank 1 batches 1 and 3
            torch.optim.AdamW = lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr)
            result = train(model, lm_loss, uneven_batches(), steps=2, grad_accum=2, lr=0.5, max_grad_norm=None,
                           progress=False)
        state = PartialState()
        torch.save({{"state": model.state_dict(), "loss": result.losses[0], "rank": state.process_index,
                     "world": state.num_processes, "backend": state.backend, "hooks": list(hooks)}},
                   {out!r} + f"/{{case}}-rank{{rank}}.pt")
""")


CASES = ("plain", "accumulate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(tmp_path) -> dict[str, list[dict]]:
    """`accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo), once for every case; each
    case's saved results of each rank."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPUs even on a GPU machine
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script), *CASES]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {case: [torch.load(tmp_path / f"{case}-rank{r}.pt") for r in range(2)] for case in CASES}


def test_two_cpu_processes_train_as_one_process_does(tmp_path, monkeypatch):
    """Both cases from one launch (starting the processes is most of the time).
    "plain": one step, each rank its own micro-batch, gradients averaged over gloo; the loop's default
    accelerator must notice the two processes.
    "accumulate": two steps of 2 micro-batches on each of 2 ranks, each rank with its own (uneven)
    batches, equal one process's steps over all 4 batches, and the by-hand gradient of the mean over
    all their label tokens; the gradients are all-reduced once per optimizer step, not per micro-batch."""
    cases = run_two_processes(tmp_path)
    ranks = cases["plain"]
    assert [(r["rank"], r["world"], r["backend"]) for r in ranks] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank saw its own batch
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), f"replicas differ in {name}"
    # and the step is the one a single process takes on both batches (DDP averages the gradients)
    single = tiny_llama(seed=0)
    train(single, lm_loss, tiny_batches(2), steps=1, lr=1e-2, grad_accum=2, max_grad_norm=None, progress=False)
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(single.state_dict()["lm_head.weight"], tiny_llama(seed=0).state_dict()["lm_head.weight"])

    ranks = cases["accumulate"]  # the worker ran it with plain SGD, and so does one process here
    use_plain_sgd(monkeypatch)
    assert ranks[0]["loss"] != ranks[1]["loss"]  # different data on each rank
    buckets = len(set(ranks[0]["hooks"]))
    assert buckets >= 1 and len(ranks[0]["hooks"]) == 2 * buckets  # two steps: two synchronizations
    single = tiny_llama(seed=0)
    train(single, lm_loss, uneven_batches(), steps=2, grad_accum=4, lr=0.5, max_grad_norm=None, progress=False)
    by_hand = tiny_llama(seed=0)
    for _ in range(2):
        sgd_step_by_hand(by_hand, uneven_batches(), lr=0.5)
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(ranks[1]["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(by_hand.state_dict()[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_lr_factor_warms_up_then_stays_or_decays_by_cosine():
    from course_lib.train import lr_factor

    assert [lr_factor(s, 10, 2) for s in (0, 1, 2, 9)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0]
    cosine = [lr_factor(s, 10, 2, cosine=True) for s in range(10)]
    assert cosine[:3] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:])) and 0 < cosine[-1] < 0.05
    assert lr_factor(6, 10, 2, cosine=True) == pytest.approx(0.5)
