"""finetune/distill.py: the teacher's stored top-k and the distillation loss (the `distill` verb is not built yet)."""

import datasets
import pytest
import torch

from finetune.distill import check_tokenizers, check_top_k, distill_loss, teacher_store
from finetune.errors import UserError


def rows(n: int = 3) -> datasets.Dataset:
    """Token rows whose first half is prompt (label -100) and second half is trained."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 200, (10 + 3 * i,), generator=g).tolist() for i in range(n)]
    labels = [[-100] * (len(x) // 2) + x[len(x) // 2:] for x in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels})


@pytest.fixture
def teacher(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def test_the_stored_top_k_is_the_teachers_own_forward_and_is_read_back(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path))
    ds = rows()
    stored, cached = teacher_store(lambda: teacher, ds, top_k=5, teacher_id="tiny")
    assert not cached
    for row in stored:
        trained = [t - 1 for t in range(1, len(row["labels"])) if row["labels"][t] != -100]
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0].float(), -1)
        want, want_ids = logprobs[trained].topk(5, dim=-1)
        assert torch.equal(torch.tensor(row["teacher_ids"]), want_ids)
        assert torch.allclose(torch.tensor(row["teacher_logprobs"]), want, atol=2e-2)  # stored as float16
    again, cached = teacher_store(lambda: 1 / 0, ds, top_k=5, teacher_id="tiny")  # no teacher needed
    assert cached and again["teacher_logprobs"] == stored["teacher_logprobs"]
    assert not teacher_store(lambda: teacher, ds, top_k=4, teacher_id="tiny")[1]  # another k: another entry
    assert not teacher_store(lambda: teacher, ds, top_k=5, teacher_id="other")[1]  # another teacher too


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_loss_is_zero_when_the_student_is_the_teacher(kind, temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g) * 3
    values, ids = torch.log_softmax(logits, -1).topk(8, dim=-1)
    assert distill_loss(logits, ids, values, kind, temperature).item() == pytest.approx(0, abs=1e-6)
    other = logits + torch.randn(6, 50, generator=g)
    assert distill_loss(other, ids, values, kind, temperature).item() > 1e-3


def test_forward_kl_is_the_textbook_sum_and_descends_to_the_teacher():
    """KL(q || p) = sum q log(q / p) over the teacher's top-k, each renormalized; a gradient step lowers it."""
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    values, ids = torch.log_softmax(teacher, -1).topk(2, dim=-1)  # words 0 and 1
    student = torch.zeros(1, 4, requires_grad=True)
    q = torch.softmax(torch.tensor([2.0, 1.0]), -1)
    assert distill_loss(student, ids, values).item() == pytest.approx((q * (q / 0.5).log()).sum().item(), rel=1e-5)
    loss = distill_loss(student, ids, values)
    loss.backward()
    with torch.no_grad():
        assert distill_loss(student - 0.5 * student.grad, ids, values) < loss


def test_bad_input_is_one_message(tiny_model):
    from transformers import AutoTokenizer

    from tests.helpers import trained_tokenizer

    with pytest.raises(UserError, match=r"distill.top_k=300: the teacher's vocabulary has 256 words"):
        check_top_k(300, 256)
    ours = AutoTokenizer.from_pretrained(tiny_model)
    check_tokenizers(ours, AutoTokenizer.from_pretrained(tiny_model))
    with pytest.raises(UserError, match="number their words differently"):
        check_tokenizers(ours, trained_tokenizer(["<pad>", "<s>", "</s>"]))
