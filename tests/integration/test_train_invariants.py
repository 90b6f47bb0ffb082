"""Loss invariants on a tiny random Llama: packed == unpacked, selective == full logits,
gradient accumulation k x b == batch k*b (transformers' sdpa on separate rows, and the default
path: sftlab_varlen on flattened, shape-rounded batches)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sftlab.data.conversation import Conversation
from sftlab.data.pack import collate, pack
from sftlab.data.render import render_many
from sftlab.train.loss import selective_loss_sum


def demo_examples(tokenizer):
    """Rendered demo conversations of different lengths and trained-token counts, plus a multi-turn one."""
    from sftlab.demo.dataset import generate_demo

    records = generate_demo({"train": 3}, seed=1)["train"]
    convs = [Conversation(r["messages"], source=r["id"]) for r in records]
    convs.append(Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
                               {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]))
    return render_many(convs, tokenizer)


def packed_rows(examples, max_len=160):
    """Examples packed into rows as train() packs them; at least one row holds several."""
    rows = [[examples[i] for i in b] for b in pack([len(e) for e in examples], max_len)]
    assert any(len(r) > 1 for r in rows), "the test must really pack several examples into a row"
    return rows


@pytest.fixture(scope="module")
def examples(tokenizer):
    return demo_examples(tokenizer)


def load_tiny(path, attn):
    """The tiny model with attention `attn`; None: the default train() picks (choose_attention)."""
    from transformers import AutoModelForCausalLM

    from sftlab.train.attention import choose_attention, register

    register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()
    choose_attention(model, attn, packing=True)
    return model


@pytest.mark.parametrize("attn,flatten", [("sdpa", False), ("eager", False), ("sftlab_varlen", False),
                                          ("sftlab_varlen", True)])
def test_packed_loss_equals_unpacked_loss(tiny_model_dir, tokenizer, examples, attn, flatten):
    model = load_tiny(tiny_model_dir, attn)
    with torch.no_grad():
        alone = [selective_loss_sum(model, collate([[e]])) for e in examples]
        rows = packed_rows(examples)
        batch = collate(rows, flatten=flatten)
        assert batch["input_ids"].shape[0] == (1 if flatten else len(rows))
        packed = selective_loss_sum(model, batch)
    total = sum(s for s, _ in alone)
    assert packed[1] == sum(n for _, n in alone)
    assert torch.allclose(packed[0], total, rtol=1e-5, atol=1e-5), (packed[0].item(), total.item())


def test_selective_chunked_loss_equals_plain_full_logits_loss(tiny_model_dir, tokenizer, examples, monkeypatch):
    import sftlab.train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CE_CHUNK", 7)  # several chunks
    model = load_tiny(tiny_model_dir, "sdpa")
    batch = collate([[e] for e in examples])
    with torch.no_grad():
        s, n = selective_loss_sum(model, batch)
        # the reference: HF's own loss on full logits (mean over trained tokens), per example
        ref_sum = 0.0
        for e in examples:
            one = collate([[e]])
            out = model(input_ids=one["input_ids"], labels=one["labels"], use_cache=False)
            ref_sum += out.loss.item() * int((one["labels"][:, 1:] != -100).sum())
    assert n == sum(int((collate([[e]])["labels"][:, 1:] != -100).sum()) for e in examples)
    assert s.item() == pytest.approx(ref_sum, rel=1e-5)


def _one_step_params(tiny_model_dir, tmp_path, tokenizer, rows, batch, accum, attn):
    """Weights after one SGD step of SFTTrainer; `attn` None: the default path, as train() collates it."""
    from functools import partial

    from transformers import TrainingArguments

    from sftlab.train.attention import NAME, can_flatten
    from sftlab.train.trainer import RowDataset, SFTTrainer

    model = load_tiny(tiny_model_dir, attn).train()
    default = attn is None
    assert can_flatten(model) == default and (model.config._attn_implementation == NAME) == default
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}a{accum}{attn}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum, max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, use_cpu=True, report_to="none", save_strategy="no", remove_unused_columns=False,
        seed=0, data_seed=0, disable_tqdm=True, dataloader_drop_last=False,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=RowDataset(rows),
                         data_collator=partial(collate, flatten=default, bucket=default))
    # no shuffling: both runs must see the same rows in the same window
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    trainer.train()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("attn", ["sdpa", None], ids=["sdpa-rows", "default-varlen-flattened"])
def test_grad_accumulation_equals_full_batch(tiny_model_dir, tmp_path, tokenizer, examples, attn):
    # one step's rows, with very different trained-token counts: one example each, or packed as train() packs them
    rows = ([[e] for e in examples] if attn else packed_rows(examples))[:4]
    assert len(rows) == 4 and len({sum(e.num_trained for e in r) for r in rows}) > 1
    full = _one_step_params(tiny_model_dir, tmp_path, tokenizer, rows, batch=4, accum=1, attn=attn)
    accumulated = _one_step_params(tiny_model_dir, tmp_path, tokenizer, rows, batch=2, accum=2, attn=attn)
    start = dict(load_tiny(tiny_model_dir, "sdpa").named_parameters())
    moved = max((full[k] - start[k]).abs().max().item() for k in full)
    assert moved > 1e-3  # the step really changed the weights
    for k in full:
        torch.testing.assert_close(accumulated[k], full[k], rtol=1e-4, atol=1e-5)


def test_bucketed_keeps_every_trained_position_and_rounds_the_count():
    from sftlab.data.pack import shape_bucket
    from sftlab.train.loss import bucketed

    assert [shape_bucket(n) for n in (1, 8, 9, 170, 1000, 2000, 2048)] == [8, 8, 16, 176, 1024, 2048, 2048]
    keep = torch.zeros(2, 100, dtype=torch.bool)
    keep[0, 10:30] = keep[1, 50:53] = True
    rows = bucketed(keep)
    assert int(rows.sum()) == 24 and bool(rows[keep].all())
    assert bucketed(rows) is rows  # already a bucket size
    small = torch.ones(1, 12, dtype=torch.bool)
    small[0, 0] = False
    assert bucketed(small) is small  # not enough free positions: unchanged


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, True)])
def test_fused_linear_cross_entropy_equals_lm_head_then_cross_entropy(dtype, autocast, smoothing):
    """Loss and gradients (hidden and a trainable head weight) of the chunked head+loss equal
    F.linear + F.cross_entropy on full logits, over several chunks and with IGNORE rows; label
    smoothing as F.cross_entropy's label_smoothing."""
    from sftlab.train.loss import linear_cross_entropy_sum

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=dtype)
    weight = torch.randn(50, 16, dtype=dtype)
    targets = torch.randint(0, 50, (37,))
    targets[[0, 5, 36]] = -100

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(h, w)
        (loss * 0.5).backward()
        return loss.detach(), h.grad, w.grad

    fused = run(lambda h, w: linear_cross_entropy_sum(h, w, targets, chunk=8, smoothing=smoothing))
    plain = run(lambda h, w: torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(h, w).float(), targets, reduction="sum", label_smoothing=smoothing))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(fused, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


def test_fused_head_chunks_by_device_and_whether_the_head_is_trained(monkeypatch):
    """A frozen head on a CPU (LoRA) is computed in FROZEN_HEAD_CPU_CHUNK-row chunks, a trained
    head in CE_CHUNK rows; the loss is the same either way, and so is the estimate's chunk."""
    import sftlab.train.loss as loss_mod
    from sftlab.estimate import estimate_memory

    monkeypatch.setattr(loss_mod, "CE_CHUNK", 12)
    monkeypatch.setattr(loss_mod, "FROZEN_HEAD_CPU_CHUNK", 5)
    chunks, apply = [], loss_mod._LinearCrossEntropy.apply
    monkeypatch.setattr(loss_mod._LinearCrossEntropy, "apply", lambda *a: chunks.append(a[4]) or apply(*a))
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(37, 16), torch.randn(50, 16), torch.randint(0, 50, (37,))
    losses = []
    for trained in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trained)
        loss = loss_mod.linear_cross_entropy_sum(h, w, targets)
        loss.backward()
        losses.append(loss.detach())
    assert chunks == [5, 12]
    torch.testing.assert_close(losses[0], losses[1])
    assert loss_mod.ce_chunk("cuda", head_trained=False) == 12
    assert "5-row chunks" in estimate_memory("default", "lora", 512, 1).notes["logits"]
    assert "12-row chunks" in estimate_memory("default", "full", 512, 1).notes["logits"]


class LiveBytes(TorchFunctionMode):
    """The highest sum of the bytes of torch functions' results alive at once (views and
    in-place results not counted twice)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t._base is None and id(t) not in self.live:
                self.live[id(t)] = t.untyped_storage().nbytes()
                weakref.finalize(t, self.live.pop, id(t), None)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


@pytest.mark.parametrize("trained", [False, True])
def test_fused_head_holds_one_chunk_of_logits_at_a_time(trained):
    """Forward + backward of the fused head + loss never holds more than one chunk's fp32 logits
    and log-probabilities (8 B x rows x vocab, what the estimate counts) plus tensors of the
    head's size: a chunk's tensors must be freed before the next one's are made."""
    from sftlab.train.loss import linear_cross_entropy_sum

    torch.manual_seed(0)
    rows, chunk, vocab, hidden = 256, 64, 4096, 8
    h = torch.randn(rows, hidden, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.bfloat16, requires_grad=trained)
    targets = torch.randint(0, vocab, (rows,))
    with LiveBytes() as live:
        linear_cross_entropy_sum(h, w, targets, chunk=chunk).backward()
    logits = 8 * chunk * vocab
    head_sized = 10 * vocab * hidden if trained else 0  # fp32 gradient accumulator + a chunk's bf16 and fp32 part
    assert logits <= live.peak < 1.1 * logits + head_sized


def test_fused_head_is_used_on_the_default_path_and_equals_full_logits(tiny_model_dir, tokenizer, examples):
    """The default path (varlen, flattened, bucketed) takes the fused head; its loss and LoRA-free
    gradients (every weight, the tied head/embedding included) equal the plain logits path."""
    import sftlab.train.loss as loss_mod

    model = load_tiny(tiny_model_dir, None).train()
    assert loss_mod.fused_head(model) is model.lm_head
    batch = collate(packed_rows(examples), flatten=True, bucket=True)

    def run(fused):
        model.zero_grad()
        original = loss_mod.fused_head
        loss_mod.fused_head = original if fused else (lambda m: None)
        try:
            s, n = selective_loss_sum(model, batch)
        finally:
            loss_mod.fused_head = original
        s.backward()
        return s.detach(), n, {k: p.grad.clone() for k, p in model.named_parameters()}

    s1, n1, g1 = run(True)
    s2, n2, g2 = run(False)
    assert n1 == n2 and torch.allclose(s1, s2, rtol=1e-5)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("where", ["around", "accelerate"])
def test_lora_under_autocast_without_input_casts_is_bit_identical_and_saves_less(tiny_model_dir, tokenizer, examples,
                                                                                  where, monkeypatch):
    """bf16 base, fp32 adapters, bf16 autocast (sftlab's LoRA default where bf16 runs), autocast
    around the loss or, as the Trainer has it, entered by accelerate inside the model's forward
    (outputs upcast to fp32): with PEFT's input casts off, loss and adapter gradients are bit for
    bit those with the casts, autograd keeps fewer bytes, and the fused head computes in bf16."""
    from accelerate.utils import convert_outputs_to_fp32
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import sftlab.train.loss as loss_mod
    from sftlab.train.attention import choose_attention, register

    register()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    choose_attention(base, None, packing=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                            init_lora_weights=False))
    if where == "accelerate":  # what accelerate's prepare_model does under mixed precision
        model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    batch = collate(packed_rows(examples), flatten=True, bucket=True)
    head_dtypes = []
    fused = loss_mod.linear_cross_entropy_sum
    monkeypatch.setattr(loss_mod, "linear_cross_entropy_sum",
                        lambda *a, dtype=None, **k: head_dtypes.append(dtype) or fused(*a, dtype=dtype, **k))

    def run(casts_off):
        model.zero_grad()
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = True
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        skip = loss_mod.skip_lora_input_casts_under_autocast
        if not casts_off:
            monkeypatch.setattr(loss_mod, "skip_lora_input_casts_under_autocast", lambda m: None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "around"), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            s, _ = selective_loss_sum(model, batch)
        monkeypatch.setattr(loss_mod, "skip_lora_input_casts_under_autocast", skip)
        s.backward()
        return s.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, sum(saved.values())

    s_off, g_off, saved_off = run(True)
    s_on, g_on, saved_on = run(False)
    assert torch.equal(s_off, s_on)
    assert g_off.keys() == g_on.keys() and g_off
    for k in g_off:
        assert torch.equal(g_off[k], g_on[k]), k
    assert saved_off < 0.9 * saved_on, (saved_off, saved_on)
    assert head_dtypes == [torch.bfloat16, torch.bfloat16]
