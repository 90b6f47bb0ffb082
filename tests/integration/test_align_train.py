"""Preference tuning on the tiny Llama: DPO learns the pairs, the reference stays put, ORPO needs
no reference model, KTO trains on unpaired data. Few steps, high learning rate: a smoke-sized
but real optimisation."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sftlab.cli import main
from sftlab.config import AlignConfig


def _arith(n: int) -> list[tuple[str, str, str]]:
    out = []
    for i in range(n):
        rnd = random.Random(i)
        a, b = rnd.randint(1, 50), rnd.randint(1, 50)
        out.append((f"What is {a} plus {b}?", f"{a + b}", f"{a * b + 7}, I believe"))
    return out


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("align") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in _arith(8)))
    return path


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("align") / "unpaired.jsonl"
    rows = [{"prompt": p, "completion": c if i % 2 else r, "label": bool(i % 2)} for i, (p, c, r) in enumerate(_arith(8))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(model_dir, data, out, **extra) -> list[str]:
    base = {"model.name_or_path": model_dir, "data.train": data, "data.validation": data, "data.max_seq_length": 96,
            "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0, "training.learning_rate": 5e-3,
            "training.per_device_train_batch_size": 4, "training.per_device_eval_batch_size": 8,
            "training.max_steps": 4, "training.logging_steps": 2, "training.eval_steps": 4, "training.bf16": False,
            "training.warmup_ratio": 0.0, "training.save_steps": 1000, "output_dir": out}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def _config(*args, **extra) -> AlignConfig:
    from sftlab.config import load_config

    return load_config(None, _overrides(*args, **extra), cls=AlignConfig)


def test_dpo_raises_margin_and_accuracy_on_training_pairs(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    assert main(["align", "-", *_overrides(tiny_model_dir, pairs_file, out, **{"training.max_steps": 6,
                                                                              "training.eval_steps": 3})]) == 0
    info = json.loads((out / "run.json").read_text())
    before, after = info["eval_before"], info["eval_after"]
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert after["rewards/margins"] > 0.05
    assert after["rewards/accuracies"] >= 0.75 > before["rewards/accuracies"]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if "eval_rewards/margins" in e]
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert all(k in evals[-1] for k in ("eval_rewards/accuracies", "eval_logps/chosen", "eval_logps/rejected"))
    assert (out / "adapter" / "adapter_config.json").exists() and info["align"]["reference"] == "adapter disabled"


def test_qlora_dpo_trains_adapters_on_a_4bit_base(tiny_model_dir, pairs_file, tmp_path, tokenizer):
    import bitsandbytes as bnb

    from sftlab.data.load import load_conversations
    from sftlab.train.align import build_trainer, load_policy
    from sftlab.train.preference import render_preferences

    cfg = _config(tiny_model_dir, pairs_file, tmp_path / "built", method="qlora")
    model, peft_config, _ = load_policy(cfg, "float32", False)
    rows = render_preferences(load_conversations(pairs_file), tokenizer, paired=True)
    trainer = build_trainer(cfg, model, peft_config, tokenizer, rows, [], tmp_path / "built", False)
    linears = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(not p.requires_grad for m in linears for p in m.parameters(recurse=False))
    assert trainer.ref_model is None  # the reference is the 4-bit base with the adapter disabled

    out = tmp_path / "qlora"
    assert main(["align", "-", *_overrides(tiny_model_dir, pairs_file, out, method="qlora",
                                           **{"training.max_steps": 6})]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["method"] == "qlora" and info["align"]["reference"] == "adapter disabled"
    assert info["eval_before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert info["eval_after"]["rewards/margins"] > 0.05
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_the_starting_evaluation_under_bf16_sees_no_difference_and_a_resume_keeps_it(tiny_model_dir, pairs_file,
                                                                                      tmp_path):
    """Full DPO in bf16 mixed precision: before any step the policy is the reference, so every reward is
    exactly 0 (the policy evaluated outside autocast while the reference's forward is inside it gave
    rewards of ~1e-5 and accuracies 0.25). A run resumed to train on reads that evaluation back instead
    of adding another step-0 line in the middle of metrics.jsonl."""
    out = tmp_path / "dpo-bf16"
    args = ["align", "-", *_overrides(tiny_model_dir, pairs_file, out, method="full", **{
        "training.bf16": True, "training.max_steps": 1, "training.learning_rate": 1e-4})]
    assert main(args) == 0
    before = json.loads((out / "run.json").read_text())["eval_before"]
    assert before["rewards/margins"] == before["rewards/accuracies"] == 0.0
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["step"] == 0 and start["eval_rewards/chosen"] == start["eval_rewards/rejected"] == 0.0
    assert start["eval_loss"] == pytest.approx(0.6931472, abs=1e-6)  # log 2
    assert main([*args, "training.max_steps=2", "--resume"]) == 0  # one step more
    starts = [e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if e.get("step") == 0 and "eval_loss" in e]
    assert len(starts) == 1 and json.loads((out / "run.json").read_text())["eval_before"] == before


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reference_log_probs_do_not_move(tiny_model_dir, pairs_file, tmp_path, tokenizer, method):
    from sftlab.data.load import load_conversations
    from sftlab.train.align import build_trainer, load_policy
    from sftlab.train.preference import render_preferences

    cfg = _config(tiny_model_dir, pairs_file, tmp_path / "run", method=method, **{"training.max_steps": 3})
    rows = render_preferences(load_conversations(pairs_file), tokenizer, paired=True)
    model, peft_config, _ = load_policy(cfg, "float32", False)
    trainer = build_trainer(cfg, model, peft_config, tokenizer, rows, [], tmp_path / "run", False)
    assert (trainer.ref_model is None) == (method == "lora")  # LoRA: no second model, the adapter is disabled
    reference = trainer.ref_model or trainer.model
    batch = trainer.data_collator(rows[:4])
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    ref_before = torch.cat(trainer.compute_ref_log_probs(reference, batch))
    trainer.train()
    ref_after = torch.cat(trainer.compute_ref_log_probs(reference, batch))
    moved = max((p.detach() - trained[n]).abs().max().item() for n, p in trainer.model.named_parameters() if n in trained)
    assert moved > 1e-4  # the policy did train
    assert torch.equal(ref_before, ref_after)


def test_orpo_runs_without_a_reference_model(tiny_model_dir, pairs_file, tmp_path, tokenizer):
    from sftlab.data.load import load_conversations
    from sftlab.train.align import build_trainer, load_policy
    from sftlab.train.orpo import ORPOTrainer
    from sftlab.train.preference import render_preferences

    cfg = _config(tiny_model_dir, pairs_file, tmp_path / "built", method="full", **{"align.loss": "orpo"})
    rows = render_preferences(load_conversations(pairs_file), tokenizer, paired=True)
    model, peft_config, _ = load_policy(cfg, "float32", False)
    trainer = build_trainer(cfg, model, peft_config, tokenizer, rows, [], tmp_path / "built", False)
    assert isinstance(trainer, ORPOTrainer) and getattr(trainer, "ref_model", None) is None
    assert len({id(m) for m in trainer.__dict__.values() if isinstance(m, torch.nn.Module)}) == 1  # the policy only

    out = tmp_path / "orpo"
    assert main(["align", "-", *_overrides(tiny_model_dir, pairs_file, out, method="full",
                                           **{"align.loss": "orpo", "training.learning_rate": 2e-3})]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["align"]["reference"] == "none" and (out / "model" / "config.json").exists()
    assert info["eval_after"]["rewards/margins"] > info["eval_before"]["rewards/margins"]
    assert info["eval_after"]["logps/chosen"] > info["eval_before"]["logps/chosen"]  # its SFT term


def test_kto_runs_on_unpaired_data(tiny_model_dir, unpaired_file, tmp_path):
    out = tmp_path / "kto"
    assert main(["align", "-", *_overrides(tiny_model_dir, unpaired_file, out, **{"align.loss": "kto"})]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["train_data"]["rows"] == 8
    assert info["eval_after"]["rewards/margins"] > info["eval_before"]["rewards/margins"] + 0.01


def _token_logps(model, batch) -> torch.Tensor:
    """Log-prob of each next token, by a plain forward (no TRL code)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]


def _answer_logps(model, batch) -> torch.Tensor:
    """Summed log-probs of the answer tokens."""
    return (_token_logps(model, batch) * batch["completion_mask"][:, 1:]).sum(-1)


def test_dpo_on_an_sft_lora_run_uses_the_sft_model_as_reference(tiny_model_dir, pairs_file, tmp_path, tokenizer):
    from sftlab.data.load import load_conversations
    from sftlab.models import load_model
    from sftlab.train.align import build_trainer, load_policy
    from sftlab.train.preference import render_preferences

    sft = tmp_path / "sft"
    assert main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={pairs_file}", "lora.r=8",
                 "training.max_steps=3", "training.learning_rate=1e-2", "training.bf16=false",
                 f"output_dir={sft}"]) == 0
    cfg = _config(sft, pairs_file, tmp_path / "dpo", **{"training.max_steps": 2})
    rows = render_preferences(load_conversations(pairs_file), tokenizer, paired=True)
    model, peft_config, base = load_policy(cfg, "float32", False)
    assert peft_config is None and str(base) == str(tiny_model_dir)  # the SFT adapter keeps training
    trainer = build_trainer(cfg, model, peft_config, tokenizer, rows, [], tmp_path / "dpo", False)
    batch = trainer.data_collator(rows[:4])
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    sft_model = load_model(str(sft)).eval()
    torch.testing.assert_close(reference, _answer_logps(sft_model, batch), atol=2e-4, rtol=0)
    base_model = load_model(str(tiny_model_dir)).eval()
    assert not torch.allclose(reference, _answer_logps(base_model, batch), atol=1e-2)  # not the bare base

    out = tmp_path / "dpo-run"
    assert main(["align", "-", *_overrides(sft, pairs_file, out, **{"training.max_steps": 2})]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["align"]["reference"] == "frozen copy of the SFT adapter"
    assert not (out / "adapter" / "ref").exists()
    tuned = load_model(str(out)).eval()  # base + the DPO-trained adapter, as any run loads
    assert not torch.allclose(_answer_logps(tuned, batch), _answer_logps(sft_model, batch), atol=1e-4)


def test_sft_weight_adds_the_chosen_answers_mean_nll_to_the_dpo_loss(tiny_model_dir, pairs_file, tmp_path, tokenizer):
    from sftlab.data.load import load_conversations
    from sftlab.train.align import build_trainer, load_policy
    from sftlab.train.preference import render_preferences

    rows = render_preferences(load_conversations(pairs_file), tokenizer, paired=True)
    losses = []
    for weight in (0.0, 0.5):
        cfg = _config(tiny_model_dir, pairs_file, tmp_path / str(weight), **{"align.sft_weight": weight})
        model, peft_config, _ = load_policy(cfg, "float32", False)
        trainer = build_trainer(cfg, model, peft_config, tokenizer, rows, [], tmp_path / str(weight), False)
        batch = trainer.data_collator(rows[:4])
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model.eval(), batch).item())
    logps = _token_logps(trainer.model, batch)
    chosen = batch["completion_mask"][:4, 1:].bool()
    nll = -logps[:4][chosen].mean().item()
    assert nll > 1.0  # a random model: the term is large enough to see
    assert losses[1] - losses[0] == pytest.approx(0.5 * nll, rel=1e-4)


def test_sft_weight_is_refused_for_losses_other_than_dpo(tiny_model_dir, pairs_file, tmp_path):
    from sftlab.errors import SftlabError

    with pytest.raises(SftlabError, match="sft_weight applies to loss dpo only"):
        _config(tiny_model_dir, pairs_file, tmp_path, **{"align.loss": "orpo", "align.sft_weight": 1.0})


@pytest.mark.parametrize("loss", ["dpo", "orpo", "kto"])
def test_warmup_ratio_shapes_the_learning_rate_of_every_loss(tiny_model_dir, pairs_file, unpaired_file, tmp_path,
                                                              loss):
    """configs/dpo.yaml's warmup_ratio: half of 4 steps warm up, then linear decay; each step logs
    the rate it used (without the warm-up: 1, 3/4, 1/2, 1/4 of the peak)."""
    out = tmp_path / loss
    data = unpaired_file if loss == "kto" else pairs_file
    assert main(["align", "-", *_overrides(tiny_model_dir, data, out, **{
        "align.loss": loss, "training.warmup_ratio": 0.5, "training.lr_scheduler_type": "linear",
        "training.logging_steps": 1, "training.eval_steps": 1000, "data.validation": "null"})]) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [e["learning_rate"] for e in events if "learning_rate" in e]
    assert rates == pytest.approx([0.0, 2.5e-3, 5e-3, 2.5e-3], abs=1e-9)


def test_a_named_template_that_adds_tokens_grows_the_policy_or_is_refused_for_a_lora(tiny_model_dir, pairs_file,
                                                                                      tmp_path):
    """model.chat_template=llama3 adds three tokens to SmolLM2's tokenizer. Full DPO trains their rows with
    the rest, so the policy's embeddings must grow to the tokenizer (the ids of the new tokens indexed past
    the embedding matrix: IndexError at the first step); a LoRA would hold them as PEFT trainable tokens,
    which TRL's fused LM head cannot run with (AttributeError at the first step): refused before loading."""
    from sftlab.errors import SftlabError
    from sftlab.models import load_tokenizer
    from sftlab.train.align import load_policy

    tokenizer = load_tokenizer(str(tiny_model_dir), chat_template="llama3")
    assert len(tokenizer) > 49152
    cfg = _config(tiny_model_dir, pairs_file, tmp_path / "full", method="full", **{"model.chat_template": "llama3"})
    model, peft_config, _ = load_policy(cfg, "float32", False, tokenizer)
    assert peft_config is None and model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    cfg = _config(tiny_model_dir, pairs_file, tmp_path / "lora", **{"model.chat_template": "llama3"})
    with pytest.raises(SftlabError, match=r"adds tokens.*TRL's preference trainers.*--to merged"):
        load_policy(cfg, "float32", False, tokenizer)


def test_a_lora_run_whose_adapter_trains_added_token_rows_is_refused_with_the_way_round(tiny_model_dir, pairs_file,
                                                                                         tmp_path):
    from sftlab.errors import SftlabError
    from sftlab.train.align import load_policy

    run = tmp_path / "sft"
    (run / "adapter").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"trainable_token_indices": {"embed_tokens": [49152]}}))
    cfg = _config(run, pairs_file, tmp_path / "dpo")
    with pytest.raises(SftlabError, match=rf"{run}: its adapter trains the embedding rows.*export {run} --to merged"):
        load_policy(cfg, "float32", False)
