"""course_lib.distill: the divergences against TRL's GKD loss, masking, errors, on-policy samples."""
import math

import pytest
import torch
import torch.nn.functional as F

from course_lib import distill
from course_lib.models import chat_prompts
from course_lib.runtime import profile, seeded


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture(scope="module")
def trl_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 0.9, 1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_generalized_jsd_matches_trl(trl_jsd, beta, temperature, masked):
    student, teacher = _logits(3, 7, 50, seed=1), _logits(3, 7, 50, seed=2)
    labels = None
    if masked:
        labels = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(3))
        labels[0, :4] = -100
        labels[2, 5:] = -100
    ours = distill.generalized_jsd(student, teacher, beta=beta, temperature=temperature,
                                   mask=None if labels is None else labels != -100)
    theirs = trl_jsd(student, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_gradients_match_trl(trl_jsd):
    teacher = _logits(2, 5, 40, seed=4)
    labels = torch.randint(0, 40, (2, 5))
    labels[1, :2] = -100
    grads = []
    for fn in (lambda s: distill.generalized_jsd(s, teacher, 0.5, 0.9, labels != -100),
               lambda s: trl_jsd(s, teacher, labels=labels, beta=0.5, temperature=0.9)):
        student = _logits(2, 5, 40, seed=5).requires_grad_()
        fn(student).backward()
        grads.append(student.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_kl_directions_and_textbook_formula():
    student, teacher = _logits(4, 30, seed=6), _logits(4, 30, seed=7)
    p_t, p_s = F.softmax(teacher / 2, -1), F.softmax(student / 2, -1)
    by_hand_forward = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    by_hand_reverse = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    torch.testing.assert_close(distill.forward_kl(student, teacher, temperature=2.0), by_hand_forward)
    torch.testing.assert_close(distill.reverse_kl(student, teacher, temperature=2.0), by_hand_reverse)
    assert not torch.isclose(by_hand_forward, by_hand_reverse)  # KL is not symmetric


def test_jsd_is_bounded_and_symmetric_at_half():
    student, teacher = _logits(6, 20, seed=8, scale=10), _logits(6, 20, seed=9, scale=10)
    jsd = distill.generalized_jsd(student, teacher, beta=0.5)
    assert 0 < jsd.item() <= math.log(2) + 1e-6
    torch.testing.assert_close(jsd, distill.generalized_jsd(teacher, student, beta=0.5))


@pytest.mark.parametrize("fn", [distill.forward_kl, distill.reverse_kl, distill.generalized_jsd,
                                distill.skew_kl])
def test_identical_logits_give_zero(fn):
    logits = _logits(2, 6, 64, seed=10)
    assert fn(logits, logits.clone()).abs().item() < 1e-6


def test_mask_ignores_masked_positions():
    student, teacher = _logits(2, 5, 16, seed=11), _logits(2, 5, 16, seed=12)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    changed = student.clone()
    changed[~mask] = 100.0  # garbage where the mask is False must not matter
    for fn in (distill.forward_kl, distill.reverse_kl, distill.generalized_jsd, distill.skew_kl):
        torch.testing.assert_close(fn(student, teacher, mask=mask), fn(changed, teacher, mask=mask))
        # the masked mean equals the plain mean over the selected rows
        torch.testing.assert_close(fn(student, teacher, mask=mask), fn(student[mask], teacher[mask]))


def test_skew_kl_limits():
    student, teacher = _logits(3, 20, seed=13), _logits(3, 20, seed=14)
    torch.testing.assert_close(distill.skew_kl(student, teacher, skew=0.0), distill.forward_kl(student, teacher))
    # skewing towards the teacher bounds the loss by -log(skew)
    assert distill.skew_kl(student * 50, teacher, skew=0.1).item() <= -math.log(0.1) + 1e-5


def test_hinton_kd_loss_mixes_ce_and_scaled_kl():
    student, teacher = _logits(2, 4, 10, seed=15), _logits(2, 4, 10, seed=16)
    labels = torch.tensor([[1, 2, -100, 3], [-100, 4, 5, 6]])
    mask = labels != -100
    ce = F.cross_entropy(student[mask], labels[mask])
    kl = distill.forward_kl(student, teacher, temperature=3.0, mask=mask)
    got = distill.hinton_kd_loss(student, teacher, labels, temperature=3.0, alpha=0.25)
    torch.testing.assert_close(got, 0.75 * ce + 0.25 * 9.0 * kl)


def test_mismatched_vocabularies_name_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 100\).*\(2, 3, 120\)"):
        distill.forward_kl(_logits(2, 3, 100), _logits(2, 3, 120))
    with pytest.raises(ValueError, match="mask"):
        distill.forward_kl(_logits(2, 3, 10), _logits(2, 3, 10), mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="beta"):
        distill.generalized_jsd(_logits(2, 10), _logits(2, 10), beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        distill.reverse_kl(_logits(2, 10), _logits(2, 10), temperature=0)


def test_soften_flattens_with_temperature():
    logits = torch.tensor([4.0, 2.0, 0.0, -1.0])
    cold, warm = distill.soften(logits, 1.0), distill.soften(logits, 4.0)
    entropy = lambda p: -(p * p.log()).sum()
    assert entropy(warm) > entropy(cold)
    assert torch.equal(cold.argsort(), warm.argsort())  # the ranking, the dark knowledge, is kept


def test_top_k_log_probs_are_a_distribution_over_k_plus_one_bins():
    logits = _logits(6, 50, seed=8)
    ids = logits.topk(5, dim=-1).indices
    coarse = distill.top_k_log_probs(logits, ids)
    full = F.log_softmax(logits, -1)
    assert coarse.shape == (6, 6)
    torch.testing.assert_close(coarse.logsumexp(-1), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(coarse[:, :5], full.gather(-1, ids))
    torch.testing.assert_close(coarse[:, 5].exp(), 1 - full.gather(-1, ids).exp().sum(-1))


def test_top_k_divergence_is_a_lower_bound_that_closes_with_k():
    """KL between the k + 1 bins is at most the full KL (merging outcomes never adds divergence);
    with every token kept it is the full KL, and its gradient points the same way."""
    student, teacher = _logits(8, 40, seed=9), _logits(8, 40, seed=10)
    full = float(distill.forward_kl(student, teacher))
    fidelity = {k: distill.top_k_fidelity(student, teacher, k) for k in (1, 5, 20, 39)}
    assert all(f["divergence_top_k"] <= full + 1e-5 and f["divergence_full"] == pytest.approx(full)
               for f in fidelity.values())
    masses = [fidelity[k]["teacher_mass"] for k in (1, 5, 20, 39)]
    assert masses == sorted(masses) and masses[-1] > 0.99
    assert fidelity[39]["divergence_top_k"] == pytest.approx(full, rel=1e-4)
    assert fidelity[39]["gradient_cosine"] > 0.999 > fidelity[1]["gradient_cosine"]


def test_chapter_checks_pass_the_reference_and_explain_mistakes(capsys, monkeypatch):
    from course_lib import checks
    from course_lib.train import response_labels

    monkeypatch.delenv("COURSE_CHECKS_STRICT", raising=False)
    assert checks.check_sft_labels(response_labels)
    assert not checks.check_sft_labels(lambda ids, lengths, attention: ids.clone())
    assert checks.check_forward_kl(lambda s, t, temperature: distill.forward_kl(s, t, temperature))
    assert checks.check_reverse_kl(lambda s, t, temperature: distill.reverse_kl(s, t, temperature))
    capsys.readouterr()
    assert not checks.check_forward_kl(lambda s, t, temperature: distill.reverse_kl(s, t, temperature))
    assert "other direction" in capsys.readouterr().out
    assert not checks.check_reverse_kl(lambda s, t, temperature: distill.reverse_kl(s, t))
    assert "temperature" in capsys.readouterr().out


# ----------------------------------------------------------------------------- with the real teacher

ROWS = [{"prompt": "Name a colour.", "response": "Blue is a colour."},
        {"prompt": "What is 2 plus 2?", "response": "2 plus 2 equals 4, a small even number."}]


@pytest.fixture(scope="module")
def scored(teacher):
    model, tok = teacher
    return [distill.with_teacher_logits(model, b, dtype=torch.float32)
            for b in distill.kd_batches(tok, ROWS, batch_size=2, max_length=64)]


@pytest.mark.slow
def test_teacher_logits_are_cached_at_the_response_positions(teacher, scored):
    model, _ = teacher
    batch = scored[0]
    mask = distill.response_mask(batch)
    assert batch["teacher_logits"].shape == (int(mask.sum()), model.config.vocab_size)
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    torch.testing.assert_close(batch["teacher_logits"], full[mask])
    # each cached row predicts its label (not the token before or after it)
    labels = batch["labels"][:, 1:][mask]
    aligned = (batch["teacher_logits"].argmax(-1) == labels).float().mean()
    shifted = (batch["teacher_logits"][1:].argmax(-1) == labels[:-1]).float().mean()
    assert aligned > 0.3 and aligned > 2 * shifted


@pytest.mark.slow
def test_kd_losses_vanish_for_the_teacher_itself(teacher, scored):
    model, _ = teacher
    for name in ("forward_kl", "reverse_kl", "jsd", "skew_kl"):
        assert distill.token_kd_loss(name)(model, scored[0]).item() < 1e-4, name
    # and without cached logits the teacher is asked directly
    plain = {k: v for k, v in scored[0].items() if k != "teacher_logits"}
    assert distill.token_kd_loss("forward_kl", teacher=model)(model, plain).item() < 1e-4
    with pytest.raises(ValueError, match="teacher_logits"):
        distill.token_kd_loss("forward_kl")(model, plain)
    metrics = distill.response_metrics(model, scored)
    assert metrics["top1_agreement"] == 1.0 and metrics["tokens"] == int(distill.response_mask(scored[0]).sum())


@pytest.mark.slow
def test_top_k_teacher_batches_train_and_score(teacher, scored):
    """A batch carrying only the teacher's top k: the teacher itself is at zero divergence, its top-1
    agreement is 1.0, a student's loss falls, and what needs every logit says so."""
    model, tok = teacher
    top = [distill.with_teacher_logits(model, b, top_k=16) for b in distill.kd_batches(tok, ROWS, 2, 64)]
    n = int(distill.response_mask(top[0]).sum())
    assert top[0]["teacher_top_ids"].shape == (n, 16) and top[0]["teacher_top_log_probs"].shape == (n, 17)
    assert "teacher_logits" not in top[0]
    torch.testing.assert_close(top[0]["teacher_top_ids"][:, 0], scored[0]["teacher_logits"].argmax(-1))
    assert distill.token_kd_loss("forward_kl")(model, top[0]).item() < 1e-4
    assert distill.response_metrics(model, top)["top1_agreement"] == 1.0
    student = make_small_student(model)
    result = distill.distill(student, "jsd", top, steps=4, lr=1e-3, progress=False)
    assert result.losses[-1] < result.losses[0]
    for method, temperature in (("hinton", 1.0), ("forward_kl", 2.0)):
        with pytest.raises(ValueError, match="top-k"):
            distill.distill(student, method, top, steps=1, temperature=temperature)
    with pytest.raises(ValueError, match="top_k"):
        distill.with_teacher_logits(model, top[0], top_k=0)


@pytest.mark.slow
def test_on_policy_sampler_returns_student_text_scored_by_the_teacher(teacher):
    model, tok = teacher
    student = make_small_student(model)
    prompts = ["Name a colour.", "Write one word about the sea."]
    batch = distill.sample_on_policy(student, tok, prompts, max_new_tokens=12, temperature=1.0, seed=3)
    # the sampled ids are the student's: the same seed gives the same continuation straight from generate
    heads = tok(chat_prompts(tok, prompts), return_tensors="pt", padding=True, padding_side="left",
                add_special_tokens=False)
    with seeded(3):
        again = student.generate(**heads, max_new_tokens=12, do_sample=True, temperature=1.0, top_p=None,
                                 top_k=None, pad_token_id=tok.pad_token_id)
    width = heads["input_ids"].shape[1]
    mask = batch["attention_mask"]
    assert (mask[:, 1:] <= mask[:, :-1]).all()  # right-padded, as the course scores batches
    for row in range(len(prompts)):
        prompt = heads["input_ids"][row][heads["attention_mask"][row] == 1]
        real = batch["input_ids"][row][mask[row] == 1]
        n = len(prompt)
        assert torch.equal(real[:n], prompt) and len(real) > n
        assert torch.equal(real[n:], again[row, width:width + len(real) - n])
        learned = batch["labels"][row] != -100
        assert not learned[:n].any() and learned[n:len(real)].all() and not learned[len(real):].any()
        ends = (real[n:] == tok.eos_token_id).nonzero()
        if len(ends):  # nothing after the first end-of-turn is kept
            assert len(real) == n + int(ends[0]) + 1
    scored = distill.with_teacher_logits(model, batch, dtype=torch.float32)
    with torch.no_grad():
        direct = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    torch.testing.assert_close(scored["teacher_logits"], direct[distill.response_mask(batch)])


def test_on_policy_stream_gives_each_process_its_own_data(teacher):
    """Under several processes each rank samples its own prompts with its own seed and takes its
    own share of the offline batches; one process gets the stream it always had."""
    _, tok = teacher
    from transformers import LlamaConfig, LlamaForCausalLM

    with seeded(0):
        student = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               pad_token_id=tok.pad_token_id)).eval()
    teacher_stub = student  # scoring is not what is tested here
    prompts = [f"Name a number bigger than {i}." for i in range(12)]
    draw = lambda rank, world: next(distill.on_policy_stream(student, teacher_stub, tok, prompts, [], lmbda=1.0,
                                                             batch_size=2, max_new_tokens=4, rank=rank, world=world))
    first, second, alone = draw(0, 2), draw(1, 2), draw(0, 1)
    assert not torch.equal(first["input_ids"], second["input_ids"])
    assert torch.equal(first["input_ids"], alone["input_ids"])  # rank 0 keeps the single-process stream
    offline = [{"id": i} for i in range(5)]
    take = lambda rank: [b["id"] for b, _ in zip(distill.on_policy_stream(student, student, tok, prompts, offline,
                                                                          lmbda=0.0, rank=rank, world=2), range(4))]
    assert take(0) == [0, 2, 4, 1] and take(1) == [1, 3, 0, 2]


@pytest.mark.slow
def test_on_policy_stream_mixes_student_samples_and_teacher_text(teacher, scored):
    model, tok = teacher
    student = make_small_student(model)
    offline_only = distill.on_policy_stream(student, model, tok, ["Hi."], scored, lmbda=0.0)
    assert next(offline_only) is scored[0]
    online = next(distill.on_policy_stream(student, model, tok, ["Hi.", "Name a fruit."], scored, lmbda=1.0,
                                           batch_size=2, max_new_tokens=6))
    assert online["teacher_logits"].shape[0] == int(distill.response_mask(online).sum()) > 0
    with pytest.raises(ValueError, match="lmbda"):
        next(distill.on_policy_stream(student, model, tok, ["Hi."], scored, lmbda=1.5))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "forward_kl", "reverse_kl", "jsd", "hinton", "on_policy_jsd"])
def test_distillation_reduces_its_loss(teacher, scored, method):
    model, tok = teacher
    student = make_small_student(model)
    result = distill.distill(student, method, scored, steps=4, lr=1e-3, teacher=model, tokenizer=tok,
                             prompts=["Name a colour."], lmbda=0.5, max_new_tokens=6, progress=False)
    assert len(result.losses) == 4 and all(math.isfinite(x) for x in result.losses)
    if method != "on_policy_jsd":  # on-policy batches change from step to step
        assert result.losses[-1] < result.losses[0]
    with pytest.raises(ValueError, match="method"):
        distill.distill(student, "kl", scored, steps=1)


def make_small_student(model):
    from course_lib.models import make_student

    torch.manual_seed(0)
    return make_student(model, 2, layers=[0, 29])  # chosen by hand: no calibration pass per test


@pytest.mark.slow
def test_distilled_student_is_cached_and_reloaded(teacher, tmp_path, monkeypatch):
    from course_lib.models import teacher_checkpoint_dir

    model, tok = teacher
    checkpoint = teacher_checkpoint_dir()
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    (tmp_path / checkpoint.name).symlink_to(checkpoint)  # a fresh student cache, the same teacher (no conversion)
    recipe = {**distill.capstone_recipe(profile("ci").distill),  # the same test whatever COURSE_PROFILE says
              "n_layers": 1, "warm_start_steps": 1, "steps": 1, "train_examples": 2, "batch_size": 2, "max_length": 64,
              "intermediate_size": 512}  # width-pruned, like the capstone's
    first, info = distill.distilled_student(model, tok, recipe)
    assert info["built"] and info["recipe"] == recipe and info["metrics"]["tokens"] > 0
    assert first.config.intermediate_size == 512 and first.model.layers[0].mlp.up_proj.weight.shape == (512, 576)
    again, info_again = distill.distilled_student(model, tok, recipe)
    assert not info_again["built"] and info_again["path"] == info["path"]
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert [p.name for p in (tmp_path / "students").iterdir()] == [info["path"].name]  # no temporary left
    assert distill.student_path({**recipe, "steps": 2}) != info["path"]


class _SavedMeanwhile:
    """A model whose save_pretrained writes a file, after 'another process' (two notebooks at once)
    has renamed its own complete copy of the same student into place."""

    def __init__(self, target):
        self.target = target

    def save_pretrained(self, folder, safe_serialization=True):
        other = self.target.parent / ".other"
        other.mkdir()
        (other / "course_recipe.json").write_text("{}")
        (other / "model.safetensors").write_text("the other copy")
        other.rename(self.target)
        (folder / "model.safetensors").write_text("this copy")


def test_save_student_keeps_the_copy_another_process_saved_meanwhile(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    recipe = {"method": "forward_kl", "n_layers": 2, "steps": 1}
    target = distill.student_path(recipe)
    target.parent.mkdir(parents=True)
    assert distill.save_student(_SavedMeanwhile(target), recipe) == target
    assert (target / "model.safetensors").read_text() == "the other copy"  # not replaced under its reader
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary folder left
    (target / "course_recipe.json").unlink()  # an incomplete leftover is replaced
    distill.save_student(_SavedMeanwhile(target.parent / "elsewhere"), recipe)
    assert (target / "model.safetensors").read_text() == "this copy"


def test_capstone_recipe_is_the_chapter_recipe_deeper_and_longer():
    from course_lib.evaluate import human_corpus

    for name in ("ci", "laptop", "gpu"):
        b = profile(name).distill
        chapter, capstone = distill.chapter_recipe(b), distill.capstone_recipe(b)
        assert capstone == {**chapter, "n_layers": b.capstone_layers, "steps": b.capstone_steps, "lr": b.capstone_lr,
                            "warm_start_steps": b.capstone_warm_start_steps, "train_examples": b.capstone_examples,
                            "max_length": b.capstone_max_length, "batch_size": b.capstone_batch_size,
                            "row_length": b.capstone_row_length, "top_k": b.capstone_top_k,
                            "human_texts": b.capstone_human_texts, "intermediate_size": b.capstone_intermediate_size,
                            "cpu_bfloat16": b.capstone_cpu_bfloat16}
        assert chapter["cosine"] and chapter["n_layers"] == b.student_layers and chapter["intermediate_size"] is None
        assert chapter["cpu_bfloat16"] is False  # chapter 04 compares its methods in float32
        assert chapter["row_length"] is None and chapter["top_k"] is None  # chapter 04 compares on every logit
        texts = distill.distillation_texts(capstone)
        assert len(texts) == b.capstone_human_texts
        assert not set(texts) & set(human_corpus(profile(name).capstone.eval_texts))  # chapter 07's stay held out
    ci = profile("ci").distill
    assert distill.capstone_recipe(ci) == distill.chapter_recipe(ci)  # chapter 04 saves it in CI
