"""Metric values against published and hand-computed references."""

from __future__ import annotations

import numpy as np
import pytest

from sftlab.errors import SftlabError
from sftlab.evaluation import metrics as M

# sacrebleu's README example: three hypotheses, two reference streams.
SACRE_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACRE_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def per_example_refs():
    return [list(pair) for pair in zip(*SACRE_REFS)]


def test_bleu_and_chrf_match_sacrebleu_documented_example():
    refs = per_example_refs()
    assert M.bleu(SACRE_SYS, refs) == pytest.approx(48.53, abs=0.005)  # "BLEU = 48.53 82.4/50.0/45.5/37.5 ..."
    assert M.chrf(SACRE_SYS, refs) == pytest.approx(59.73, abs=0.005)  # "chrF2 = 59.73"


def test_rouge_hand_computed_on_rouge_score_readme_example():
    # reference: the quick brown fox jumps over the lazy dog (9 tokens)
    # prediction: the quick brown dog jumps on the log (8 tokens, '.' dropped by the tokenizer)
    # unigram overlap 6 -> F = 2*6/(9+8); bigram overlap 2 (the quick, quick brown) of 8 and 7;
    # LCS "the quick brown jumps the" = 5 -> F = 2*5/(9+8)
    scores = M.rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert scores["rouge1"] == pytest.approx(12 / 17)
    assert scores["rouge2"] == pytest.approx(4 / 15)
    assert scores["rougeL"] == pytest.approx(10 / 17)


def test_classification_scores_hand_computed():
    refs = ["cat", "cat", "dog", "dog", "bird"]
    preds = ["Cat.", "dog", " dog ", "fish", "BIRD"]  # 'fish' is outside the label set: wrong
    # cat: P 1/1 R 1/2 F 2/3; dog: P 1/2 R 1/2 F 1/2; bird: P 1 R 1 F 1
    s = M.classification_scores(preds, refs)
    assert s["accuracy"] == pytest.approx(3 / 5)
    assert s["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert s["recall"] == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_exact_match_normalises_whitespace_and_optionally_case():
    preds = ["  2021-03-05 ", "hello   world", "Hello world", "other"]
    refs = ["2021-03-05", "hello world", "hello world", "x"]
    assert M.exact_match(preds, refs) == pytest.approx(2 / 4)
    assert M.exact_match(preds, refs, case_sensitive=False) == pytest.approx(3 / 4)
    assert M.exact_match(["b"], [["a", "b"]]) == 1.0  # any acceptable reference


def test_every_builtin_metric_is_a_function_of_summed_statistics():
    """Bootstrap resamples use statistics; they must give the library's numbers exactly."""
    rng = np.random.default_rng(0)
    labels = ["pos", "neg", "neutral"]
    refs = [[labels[i % 3]] for i in range(40)]
    preds = [labels[int(rng.integers(0, 3))] if i % 7 else "unsure" for i in range(40)]
    text_refs = [[f"the cat number {i} sat on the mat"] for i in range(40)]
    text_preds = [f"a cat number {i} sat on a mat" if i % 2 else f"the dog {i} sat" for i in range(40)]
    for name, p, r in [("precision", preds, refs), ("recall", preds, refs), ("macro_f1", preds, refs),
                       ("accuracy", preds, refs), ("exact_match", preds, refs), ("bleu", text_preds, text_refs),
                       ("chrf", text_preds, text_refs), ("rougeL", text_preds, text_refs)]:
        m = M.REGISTRY[name]
        stats = m.statistics(p, r)
        assert m.score_from_stats(stats.sum(0))[name] == pytest.approx(m.score(p, r)[name], abs=1e-9), name
        idx = rng.integers(0, 40, 40)  # a resample, as a count vector
        counts = np.bincount(idx, minlength=40)
        sub_p, sub_r = [p[i] for i in idx], [r[i] for i in idx]
        assert m.score_from_stats(counts @ stats)[name] == pytest.approx(m.score(sub_p, sub_r)[name], abs=1e-9), name


def test_user_metric_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def length_ratio(predictions, references):\n"
        "    return sum(len(p) for p in predictions) / sum(len(r) for r in references)\n"
        "def two(predictions, references):\n"
        "    return {'a': 1, 'b': 2.5}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    scores = M.compute(M.resolve(["my_metrics:length_ratio", "my_metrics:two"]), ["abcd", "ef"], ["ab", "c"])
    assert scores == {"length_ratio": pytest.approx(6 / 3), "a": 1.0, "b": 2.5}


def test_unknown_metric_names_the_closest():
    with pytest.raises(SftlabError, match="Did you mean 'rougeL'"):
        M.resolve(["rougel"])
    with pytest.raises(SftlabError, match="cannot load metric 'no_such_module:f'"):
        M.resolve(["no_such_module:f"])


def test_aliases_expand():
    assert M.expand(["rouge", "classification", "em"]) == [
        "rouge1", "rouge2", "rougeL", "accuracy", "precision", "recall", "macro_f1", "exact_match"]


def test_final_answer_compares_math_answers_as_values():
    """A math set's references hold a worked solution: exact match scored a right answer 0 unless the whole
    reasoning matched. The final answer (GSM8K's `####`, a `\\boxed{}`, else the last number) is compared
    by math-verify's equivalence."""
    gsm8k = "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"
    cases = [
        ("9 eggs at $2 each make 18 dollars.\n#### 18", gsm8k, 1.0),
        ("#### 18\nI hope this helps with your 2 questions.", gsm8k, 1.0),  # after the marker: not the last number
        ("She makes 9 * 2 = $20.\n#### 20", gsm8k, 0.0),
        ("The answer is $0.5$.", "So $x = \\boxed{\\frac{1}{2}}$.", 1.0),
        ("We get \\boxed{1+x^2}", "\\boxed{x^2 + 1}", 1.0),
        ("About 1000 people.", "#### 1,000", 1.0),
        ("I do not know.", "#### 7", 0.0),
    ]
    for pred, ref, expected in cases:
        assert M.REGISTRY["final_answer"].per_example(pred, [ref]) == {"final_answer": expected}, (pred, ref)
    assert M.REGISTRY["final_answer"].score([c[0] for c in cases], [[c[1]] for c in cases]) == {
        "final_answer": pytest.approx(5 / 7)}


def test_a_math_set_gets_final_answer_by_default():
    from sftlab.data.conversation import Conversation
    from sftlab.evaluation.evaluate import default_metrics

    def conv(answer):
        return Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}])

    assert "final_answer" in default_metrics([conv("2 + 2 = 4\n#### 4"), conv("so \\boxed{7}")])
    assert "final_answer" not in default_metrics([conv("2 + 2 = 4\n#### 4"), conv("Paris")])


def test_a_comparison_says_now_right_by_the_final_answer_where_a_set_has_one():
    """On a math set exact match is 0 for both models almost everywhere: the report's now right / now wrong
    lists were empty however many answers the tuned model got right."""
    from sftlab.evaluation.compare import changed_examples
    from sftlab.evaluation.evaluate import EvalResult

    def result(right):
        return EvalResult({}, {}, [{"source": f"t:{i}", "prompt": [{"role": "user", "content": "q"}], "reference": "#### 4",
                                    "prediction": "p", "scores": {"exact_match": 0.0, "final_answer": float(r)}}
                                   for i, r in enumerate(right)])

    changed = changed_examples(result([0, 0, 1]), result([1, 1, 0]))
    assert (changed["key"], changed["now_right_count"], changed["now_wrong_count"]) == ("final_answer", 2, 1)
