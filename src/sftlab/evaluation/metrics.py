"""Text metrics, computed by the libraries people cite: scikit-learn, sacrebleu, rouge-score,
math-verify.

A metric maps predictions and references to a dict of scores. Each reference is one
string or a list of acceptable strings (e.g. several translations). Scales follow the
libraries: exact match, final answer, accuracy, precision, recall, macro-F1 and ROUGE are in
[0, 1]; BLEU and chrF are in [0, 100] as sacrebleu reports them.

A user metric is named by import path, `"package.module:function"`; the function takes
`(predictions: list[str], references: list[str])` and returns a float or a dict of floats.
"""

from __future__ import annotations

import difflib
import importlib
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sftlab.errors import SftlabError

References = Sequence["str | Sequence[str]"]
Scores = dict[str, float]


def normalize(text: str, *, case_sensitive: bool = True) -> str:
    """Strip and collapse whitespace (and casefold unless `case_sensitive`)."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if case_sensitive else text.casefold()


def normalize_label(text: str) -> str:
    """Label comparison for classification: whitespace and case ignored, trailing '.' or '!' too."""
    return normalize(text, case_sensitive=False).rstrip(".!").strip()


def reference_lists(references: References) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def _check(predictions: Sequence[str], refs: list[list[str]]) -> None:
    if len(predictions) != len(refs):
        raise ValueError(f"{len(predictions)} predictions for {len(refs)} references")


# --- per-example scores (prediction, acceptable references) -> float ---------------------


def _exact(pred: str, refs: list[str], case_sensitive: bool) -> float:
    p = normalize(pred, case_sensitive=case_sensitive)
    return float(any(p == normalize(r, case_sensitive=case_sensitive) for r in refs))


def _label_correct(pred: str, refs: list[str]) -> float:
    return float(normalize_label(pred) == normalize_label(refs[0]))


GSM8K_MARKER = "####"  # GSM8K's answers end "#### 72"


def final_answer_text(text: str) -> str:
    """Where an answer's final answer is: the line after its last GSM8K marker, else the whole text (math-verify
    then takes the last `\\boxed{}`, else the last number or expression)."""
    _, marker, tail = text.rpartition(GSM8K_MARKER)
    return tail.strip().split("\n", 1)[0] if marker else text


def _final_answer(pred: str, refs: list[str]) -> float:
    """1.0 where the prediction's final answer equals a reference's by math-verify's equivalence (0.5 =
    1/2 = \\frac{1}{2}, 1,000 = 1000, x^2+1 = 1+x^2); its timeouts use signal.alarm, so only in the main thread."""
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    answer = parse(final_answer_text(pred), parsing_timeout=timeout)
    return float(bool(answer) and any(
        verify(parse(final_answer_text(r), parsing_timeout=timeout), answer, timeout_seconds=timeout) for r in refs))


_ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
# CJK ideographs and kana: scripts written without spaces between words.
_CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


class RougeTokenizer:
    """rouge-score's tokenisation (lowercase, runs of letters and digits) for every script.

    Its default keeps only a-z and 0-9, so Russian or Chinese text has no tokens and scores 0;
    here letters, digits and combining marks of any script count, and each CJK character is a
    token. On ASCII text the tokens are rouge-score's own."""

    def tokenize(self, text: str) -> list[str]:
        import unicodedata

        text = "".join(c if unicodedata.category(c)[0] in "LNM" else " " for c in text.lower())
        return _CJK.sub(r" \g<0> ", text).split()


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(_ROUGE_KEYS), tokenizer=RougeTokenizer())


def _rouge(pred: str, refs: list[str], scorer) -> Scores:
    scores = scorer.score_multi(refs, pred) if len(refs) > 1 else scorer.score(refs[0], pred)
    return {k: scores[k].fmeasure for k in _ROUGE_KEYS}


# --- corpus metrics ----------------------------------------------------------------------


def exact_match(predictions: Sequence[str], references: References, *, case_sensitive: bool = True) -> float:
    """Share of predictions equal to a reference after `normalize`."""
    refs = reference_lists(references)
    _check(predictions, refs)
    if not refs:
        return 0.0
    return sum(_exact(p, r, case_sensitive) for p, r in zip(predictions, refs)) / len(refs)


def classification_scores(predictions: Sequence[str], references: References) -> Scores:
    """Accuracy and macro precision/recall/F1 over the label set of the references.

    Labels are compared with `normalize_label`. A prediction outside the label set is wrong:
    it is a miss for the true class and a hit for no class.
    """
    from sklearn.metrics import precision_recall_fscore_support

    refs = reference_lists(references)
    _check(predictions, refs)
    if not refs:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "macro_f1": 0.0}
    y_true = [normalize_label(r[0]) for r in refs]
    y_pred = [normalize_label(p) for p in predictions]
    labels = sorted(set(y_true))
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    accuracy = sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)
    return {"accuracy": accuracy, "precision": float(precision), "recall": float(recall), "macro_f1": float(f1)}


def _sacrebleu_refs(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants reference *streams*; examples with fewer references get None."""
    n = max((len(r) for r in refs), default=1)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(n)]


def bleu_tokenizer(refs: list[list[str]]) -> str:
    """sacrebleu's `zh` tokenizer (each CJK character a word) for references holding CJK characters,
    else its default `13a`, which keeps a run of them as one word: Chinese BLEU near 0."""
    return "zh" if any(r and _CJK.search(r) for rs in refs for r in rs) else "13a"


def bleu(predictions: Sequence[str], references: References) -> float:
    import sacrebleu

    refs = reference_lists(references)
    _check(predictions, refs)
    return float(sacrebleu.corpus_bleu(list(predictions), _sacrebleu_refs(refs), tokenize=bleu_tokenizer(refs)).score)


def chrf(predictions: Sequence[str], references: References) -> float:
    import sacrebleu

    refs = reference_lists(references)
    _check(predictions, refs)
    return float(sacrebleu.corpus_chrf(list(predictions), _sacrebleu_refs(refs)).score)


def rouge(predictions: Sequence[str], references: References) -> Scores:
    """Mean ROUGE-1/2/L F-measure (rouge-score, no stemming; best reference per example)."""
    refs = reference_lists(references)
    _check(predictions, refs)
    scorer = _rouge_scorer()
    per = [_rouge(p, r, scorer) for p, r in zip(predictions, refs)]
    return {k: (sum(s[k] for s in per) / len(per) if per else 0.0) for k in _ROUGE_KEYS}


# --- registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A named metric.

    `per_example(prediction, refs)` gives the scores saved beside each prediction;
    `corpus(predictions, refs)` the overall scores (without it: the mean of `per_example`).
    Every built-in metric is also a function of summed per-example statistics
    (`statistics` -> rows, `from_stats` on their sum), which makes bootstrap resampling
    cheap: a resample is a weighted sum of rows, not a new call to the library.
    """

    name: str
    corpus: Callable[[Sequence[str], list[list[str]]], Scores] | None = None
    per_example: Callable[[str, list[str]], Scores] | None = None
    stats: Callable[[Sequence[str], list[list[str]]], Any] | None = None
    from_stats: Callable[[Any], Scores] | None = None

    @property
    def is_mean(self) -> bool:
        return self.corpus is None

    def score(self, predictions: Sequence[str], refs: list[list[str]]) -> Scores:
        if self.corpus is not None:
            return self.corpus(predictions, refs)
        per = [self.per_example(p, r)[self.name] for p, r in zip(predictions, refs)]
        return {self.name: sum(per) / len(per) if per else 0.0}

    def statistics(self, predictions: Sequence[str], refs: list[list[str]], per_example: Sequence[float] | None = None):
        """Per-example statistics (an N x k array), or None for a metric without them (user metrics).

        A mean metric may reuse already computed `per_example` scores."""
        import numpy as np

        if self.stats is not None:
            return np.asarray(self.stats(predictions, refs), dtype=np.float64)
        if not self.is_mean:
            return None
        if per_example is None:
            per_example = [self.per_example(p, r)[self.name] for p, r in zip(predictions, refs)]
        return np.stack([np.asarray(per_example, dtype=np.float64), np.ones(len(per_example))], axis=1)

    def score_from_stats(self, summed) -> Scores:
        if self.from_stats is not None:
            return self.from_stats(summed)
        return {self.name: float(summed[0] / summed[1]) if summed[1] else 0.0}


def _sentence_bleu(pred: str, refs: list[str]) -> Scores:
    import sacrebleu

    return {"bleu": float(sacrebleu.sentence_bleu(pred, refs, tokenize=bleu_tokenizer([refs])).score)}


def _sentence_chrf(pred: str, refs: list[str]) -> Scores:
    import sacrebleu

    return {"chrf": float(sacrebleu.sentence_chrf(pred, refs).score)}


def confusion_rows(predictions: Sequence[str], refs: list[list[str]]):
    """One row per example: a one-hot (true label, predicted label or 'outside') cell of the
    flattened confusion matrix. Summing rows gives the confusion matrix."""
    import numpy as np

    y_true = [normalize_label(r[0]) for r in refs]
    labels = sorted(set(y_true))
    index = {label: i for i, label in enumerate(labels)}
    width = len(labels) + 1  # last column: a prediction outside the label set
    rows = np.zeros((len(y_true), len(labels) * width))
    for n, (t, p) in enumerate(zip(y_true, predictions)):
        rows[n, index[t] * width + index.get(normalize_label(p), len(labels))] = 1.0
    return rows


def scores_from_confusion(flat) -> Scores:
    """Same numbers as `classification_scores` (sklearn, macro over labels present in the
    references, zero_division=0), from a flattened confusion matrix."""
    import numpy as np

    n_labels = int((1 + (1 + 4 * len(flat)) ** 0.5) / 2) - 1  # solve L * (L + 1) = len
    cm = np.asarray(flat, dtype=np.float64).reshape(n_labels, n_labels + 1)
    tp = np.diag(cm[:, :n_labels])
    support, predicted = cm.sum(axis=1), cm[:, :n_labels].sum(axis=0)
    present = support > 0
    if not present.any():
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "macro_f1": 0.0}
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        denom = support + predicted
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
    return {"accuracy": float(tp.sum() / cm.sum()), "precision": float(precision[present].mean()),
            "recall": float(recall[present].mean()), "macro_f1": float(f1[present].mean())}


def _classification_metric(key: str) -> Metric:
    def from_stats(summed) -> Scores:
        return {key: scores_from_confusion(summed)[key]}

    if key == "accuracy":
        return Metric(key, per_example=lambda p, r: {"accuracy": _label_correct(p, r)})
    return Metric(key, corpus=lambda preds, refs: {key: classification_scores(preds, refs)[key]},
                  stats=confusion_rows, from_stats=from_stats)


def _sacrebleu_metric(name: str, cls_name: str, corpus_fn, sentence_fn, options=lambda refs: {}) -> Metric:
    """BLEU / chrF with sacrebleu's own sufficient statistics (what its paired bootstrap uses);
    `options(refs)`: the metric's arguments for these references."""

    def metric(refs=()):
        import sacrebleu

        return getattr(sacrebleu, cls_name)(**options(refs))

    def stats(preds, refs):
        return metric(refs)._extract_corpus_statistics(list(preds), _sacrebleu_refs(refs))

    def from_stats(summed) -> Scores:
        return {name: float(metric()._compute_score_from_stats(list(summed)).score)}

    return Metric(name, corpus=lambda preds, refs: {name: corpus_fn(preds, refs)}, per_example=sentence_fn,
                  stats=stats, from_stats=from_stats)


def _rouge_metric(key: str) -> Metric:
    scorer = []  # built on first use: rouge-score's tokenizer setup is not free

    def per(pred: str, refs: list[str]) -> Scores:
        if not scorer:
            scorer.append(_rouge_scorer())
        return {key: _rouge(pred, refs, scorer[0])[key]}

    return Metric(key, per_example=per)


REGISTRY: dict[str, Metric] = {
    "exact_match": Metric("exact_match", per_example=lambda p, r: {"exact_match": _exact(p, r, True)}),
    "exact_match_ci": Metric("exact_match_ci", per_example=lambda p, r: {"exact_match_ci": _exact(p, r, False)}),
    "final_answer": Metric("final_answer", per_example=lambda p, r: {"final_answer": _final_answer(p, r)}),
    **{k: _classification_metric(k) for k in ("accuracy", "precision", "recall", "macro_f1")},
    "bleu": _sacrebleu_metric("bleu", "BLEU", bleu, _sentence_bleu, lambda refs: {"tokenize": bleu_tokenizer(refs)}),
    "chrf": _sacrebleu_metric("chrf", "CHRF", chrf, _sentence_chrf),
    **{k: _rouge_metric(k) for k in _ROUGE_KEYS},
}
ALIASES: dict[str, list[str]] = {
    "classification": ["accuracy", "precision", "recall", "macro_f1"],
    "f1": ["macro_f1"],
    "em": ["exact_match"],
    "rouge": list(_ROUGE_KEYS),
}
# Computed from the model rather than from predicted text (see sftlab.evaluation.evaluate).
MODEL_METRICS = ("perplexity", "choice")
LOWER_IS_BETTER = {"perplexity", "loss"}


def user_metric(path: str) -> Metric:
    """Load `package.module:function` as a metric (see the module docstring for its contract)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise SftlabError(f"a user metric is 'package.module:function', got '{path}'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SftlabError(f"cannot load metric '{path}': {e}") from e
    if not callable(fn):
        raise SftlabError(f"metric '{path}' is not a function")

    def corpus(preds: Sequence[str], refs: list[list[str]]) -> Scores:
        value = fn(list(preds), [r[0] for r in refs])
        if isinstance(value, dict):
            return {str(k): float(v) for k, v in value.items()}
        try:
            return {attr: float(value)}
        except (TypeError, ValueError) as e:
            raise SftlabError(f"metric '{path}' returned {type(value).__name__}, expected a number or dict") from e

    return Metric(attr, corpus=corpus)


def expand(names: Sequence[str]) -> list[str]:
    """Metric names with aliases (`rouge`, `classification`, ...) expanded, order kept, no repeats."""
    out: list[str] = []
    for name in names:
        out += ALIASES.get(name, [name])
    return list(dict.fromkeys(out))


def resolve(names: Sequence[str]) -> list[Metric]:
    """Registry names, aliases and `module:function` paths -> Metrics; unknown names are an error."""
    metrics = []
    for name in expand(names):
        if name in REGISTRY:
            metrics.append(REGISTRY[name])
        elif ":" in name:
            metrics.append(user_metric(name))
        else:
            known = [*REGISTRY, *ALIASES, *MODEL_METRICS]
            lower = {k.casefold(): k for k in known}
            close = difflib.get_close_matches(name.casefold(), list(lower), n=1)
            hint = f" Did you mean '{lower[close[0]]}'?" if close else ""
            raise SftlabError(
                f"unknown metric '{name}'.{hint} Known: {', '.join(known)}, "
                "or a function as 'package.module:function'"
            )
    return metrics


def compute(metrics: Sequence[Metric], predictions: Sequence[str], references: References) -> Scores:
    """All corpus scores of `metrics`, merged into one dict."""
    refs = reference_lists(references)
    out: Scores = {}
    for m in metrics:
        out.update(m.score(predictions, refs))
    return out
