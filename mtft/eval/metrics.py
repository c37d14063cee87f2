"""Generation metrics, from well-kept packages: exact match, ROUGE-L (rouge-score), chrF and BLEU
(sacrebleu). All are on a 0-100 scale; none downloads anything.

Predictions and references are normalized the same way first (`normalize`): surrounding whitespace
stripped and case folded when the task asks for it.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

from mtft.data.config import Metric


def normalize(text: str, strip: bool = True, lowercase: bool = False) -> str:
    text = text.strip() if strip else text
    return text.lower() if lowercase else text


def _exact(predictions: list[str], references: list[str]) -> tuple[float, list[float]]:
    each = [100.0 * (p == r) for p, r in zip(predictions, references, strict=True)]
    return statistics.fmean(each), each


def _rouge_l(predictions: list[str], references: list[str]) -> tuple[float, list[float]]:
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # its "Using default tokenizer." line
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    each = [
        100.0 * scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return statistics.fmean(each), each


def _sacrebleu(kind: str) -> Callable[[list[str], list[str]], tuple[float, list[float]]]:
    def score(predictions: list[str], references: list[str]) -> tuple[float, list[float]]:
        from sacrebleu.metrics import BLEU, CHRF

        metric = CHRF() if kind == "chrf" else BLEU()
        sentence = CHRF() if kind == "chrf" else BLEU(effective_order=True)  # sentence BLEU needs it
        corpus = metric.corpus_score(predictions, [references]).score
        each = [sentence.sentence_score(p, [r]).score for p, r in zip(predictions, references, strict=True)]
        return corpus, each

    return score


SCORERS = {
    Metric.exact_match: _exact,
    Metric.rouge_l: _rouge_l,
    Metric.chrf: _sacrebleu("chrf"),
    Metric.bleu: _sacrebleu("bleu"),
}


def score(metric: Metric | str, predictions: list[str], references: list[str]) -> tuple[float, list[float]]:
    """(the task's score, each example's score) on normalized texts; corpus-level for chrF and BLEU."""
    if not predictions:
        return float("nan"), []
    return SCORERS[Metric(metric)](predictions, references)
