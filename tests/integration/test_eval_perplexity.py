"""Perplexity == exp(training loss) on the same data; the multiple-choice scorer's arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.conversation import Conversation
from sftlab.data.render import render
from sftlab.evaluation.choice import score_choices
from sftlab.evaluation.perplexity import perplexity, sequence_logprobs


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def conversations():
    convs = [
        Conversation([{"role": "user", "content": f"Convert {n} to words."}, {"role": "assistant", "content": w}],
                     f"mem:{i}")
        for i, (n, w) in enumerate([(3, "three"), (12, "twelve"), (40, "forty"), (7, "seven, and that is all")])
    ]
    convs.append(Conversation([{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                               {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye!"}],
                              "mem:multi"))
    return convs


def reference_loss(model, examples):
    """Training loss the plain way: one forward per example, shifted CE over the labels, token-weighted."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            labels = torch.tensor(ex.labels)
            total += F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    return total / count


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_is_exp_of_training_loss(model, tokenizer, batch_size):
    convs = conversations()
    examples = [render(c, tokenizer) for c in convs]
    loss = reference_loss(model, examples)
    result = perplexity(model, tokenizer, convs, batch_size=batch_size, progress=False)
    assert result.tokens == sum(ex.num_trained for ex in examples)
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)


def test_per_example_log_likelihoods_do_not_depend_on_batching(model, tokenizer, monkeypatch):
    examples = [render(c, tokenizer) for c in conversations()]
    one = sequence_logprobs(model, examples, batch_size=1)
    many = sequence_logprobs(model, examples, batch_size=5)
    monkeypatch.setattr("sftlab.evaluation.perplexity.LOGITS_BUDGET", 1)  # one row per forward
    split = sequence_logprobs(model, examples, batch_size=5)
    for a, b, c in zip(one, many, split):
        assert a.tokens == b.tokens == c.tokens
        assert a.logprob == pytest.approx(b.logprob, rel=1e-5, abs=1e-4)
        assert a.logprob == pytest.approx(c.logprob, rel=1e-5, abs=1e-4)


def test_multiple_choice_picks_the_best_length_normalised_option(model, tokenizer):
    prompt = [{"role": "user", "content": "What colour is the sky?"}]
    choices = ["blue", "green", "a very long answer that goes on"]
    conv = Conversation([*prompt, {"role": "assistant", "content": "blue"}], "mem:mc", meta={"choices": choices})
    [result] = score_choices(model, tokenizer, [conv], progress=False)
    # Each option's log-prob: the option as the (last) assistant turn, masked like training.
    expected = []
    for c in choices:
        ex = render(Conversation([*prompt, {"role": "assistant", "content": c}]), tokenizer)
        expected.append(-reference_loss(model, [ex]) * ex.num_trained / len(c.encode()))
    assert result.scores == pytest.approx(expected, rel=1e-5)
    assert result.predicted == max(range(3), key=expected.__getitem__)
    assert result.answer == 0 and result.correct == (result.predicted == 0)


def test_evaluate_with_choices_scores_without_generating(model, tokenizer, monkeypatch):
    from sftlab.errors import DataError
    from sftlab.evaluation.evaluate import evaluate

    monkeypatch.setattr("sftlab.evaluation.generate.generate_ids", None)  # 'choice' alone must not generate
    convs = [Conversation([{"role": "user", "content": f"Pick {i}"}, {"role": "assistant", "content": "b"}],
                          f"mc:{i}", meta={"choices": ["a", "b", "c"], "task": "mc"}) for i in range(4)]
    result = evaluate(model, tokenizer, convs, metrics=["choice"], progress=False)
    correct = [r["choice"]["predicted"] == 1 for r in result.records]
    assert result.metrics == {"choice_accuracy": sum(correct) / 4}
    assert all(r["choice"]["answer"] == 1 for r in result.records)
    convs.append(Conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "mc:none"))
    with pytest.raises(DataError, match="mc:none: metric 'choice' needs 'choices'"):
        evaluate(model, tokenizer, convs, metrics=["choice"], progress=False)
    bad = Conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}], "mc:bad",
                       meta={"choices": ["a", "b"]})
    with pytest.raises(DataError, match="mc:bad: answer 'z' is not one of the choices"):
        evaluate(model, tokenizer, [bad], metrics=["choice"], progress=False)
