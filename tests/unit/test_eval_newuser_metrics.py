"""Metrics on non-English text and multiple-choice answer keys, checked against the libraries' own numbers."""

from __future__ import annotations

import pytest

from sftlab.data.conversation import Conversation
from sftlab.errors import DataError
from sftlab.evaluation import metrics as M
from sftlab.evaluation.choice import answer_index


def test_rouge_counts_the_words_of_every_script():
    # rouge-score's default tokenizer keeps only a-z0-9: both of these scored 0.0.
    ru = M.rouge(["Кошка сидит на ковре"], ["Кошка сидит на полу"])  # 3 of 4 words shared
    assert ru["rouge1"] == pytest.approx(3 / 4) and ru["rouge2"] == pytest.approx(2 / 3)
    zh = M.rouge(["猫坐在垫子上"], ["猫在垫子上"])  # one token per character: 5 shared of 6 and 5
    assert zh["rouge1"] == pytest.approx(2 * 5 / 11)


def test_rouge_on_ascii_text_is_rouge_scores_own():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    pairs = [("The cat's toy_box cost $3.50!", "the cat had a toy box; it cost 3.50"),
             ("Q3 revenue rose 12% (YoY).", "Revenue in Q3 rose by 12 percent year over year"), ("", "empty")]
    for pred, ref in pairs:
        expected = {k: v.fmeasure for k, v in scorer.score(ref, pred).items()}
        assert M.rouge([pred], [ref]) == pytest.approx(expected)


def test_bleu_on_chinese_uses_sacrebleus_zh_tokenizer():
    import sacrebleu

    hyps = ["猫坐在垫子上。", "今天天气很好。"]
    refs = [["猫在垫子上。"], ["今天天气非常好。"]]
    expected = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]], tokenize="zh").score  # 57.2; 13a gives 0.0
    assert M.bleu(hyps, refs) == pytest.approx(expected) and expected > 50
    metric = M.REGISTRY["bleu"]  # the bootstrap's statistics give the same number
    assert metric.score_from_stats(metric.statistics(hyps, refs).sum(0))["bleu"] == pytest.approx(expected)
    assert metric.per_example(hyps[0], refs[0])["bleu"] == pytest.approx(
        sacrebleu.sentence_bleu(hyps[0], refs[0], tokenize="zh").score)


def _item(answer) -> Conversation:
    return Conversation([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "mc.jsonl:1",
                        meta={"choices": ["3", "4", "5", "22"], "answer": answer})


@pytest.mark.parametrize("answer", [1, "4", "B", "b"])
def test_multiple_choice_answer_by_index_text_or_letter(answer):
    assert answer_index(_item(answer)) == 1


@pytest.mark.parametrize("answer", ["E", 4, "1"])
def test_multiple_choice_answer_outside_the_choices_names_the_record(answer):
    with pytest.raises(DataError, match="mc.jsonl:1"):
        answer_index(_item(answer))
