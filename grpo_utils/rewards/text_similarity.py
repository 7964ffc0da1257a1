"""Text-similarity reward against a reference answer: SQuAD token F1, ROUGE (rouge-score),
sentence BLEU (sacrebleu) and the completion's distinct-n, combined as a weighted mean."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from grpo_utils.rewards.extract import last_tag_content

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of the normalized texts (1.0 when both are empty, 0.0 when one is)."""
    pred, ref = squad_normalize(prediction).split(), squad_normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def distinct_n(text: str, n: int) -> float:
    """Distinct n-grams / all n-grams of one text's normalized tokens (as :func:`token_f1` sees them).

    Scored per completion, so it rewards a reply that does not repeat itself; it never looks at the
    reference. A text with fewer than ``n`` tokens has no n-grams and scores 0.0, not 1.0, so empty
    or one-word replies do not earn full diversity.
    """
    tokens = squad_normalize(text).split()
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class TextSimilarity:
    """``reward = (f1_weight * f1 + rouge_weight * rouge + bleu_weight * bleu
    + distinct_weight * distinct) / sum of weights``.

    ``rouge`` is the F-measure of ``rouge_type``; ``bleu`` is sacrebleu's sentence BLEU / 100;
    ``distinct`` is the completion's :func:`distinct_n` (``distinct_n``-grams), a diversity term
    that needs no reference (weight 0 by default, so it only counts when asked for).
    The reference is ``row[reference_field]`` (a string, or a list of strings: the best match of
    each metric counts). With ``use_answer_tag`` the content of the last ``<answer>`` tag is
    compared when there is one. Scores: ``f1``, ``rouge1``, ``rougeL`` (and ``rouge_type``'s
    if another), ``bleu``, ``distinct{distinct_n}`` (always, whatever its weight), ``reward``.
    """

    def __init__(self, f1_weight: float = 1.0, rouge_weight: float = 1.0, bleu_weight: float = 1.0,
                 rouge_type: str = "rougeL", reference_field: str = "answer", use_stemmer: bool = False,
                 lowercase_bleu: bool = True, use_answer_tag: bool = False, distinct_weight: float = 0.0,
                 distinct_n: int = 2):
        from rouge_score import rouge_scorer

        weights = (f1_weight, rouge_weight, bleu_weight, distinct_weight)
        if rouge_type not in ROUGE_TYPES:
            raise ValueError(f"rouge_type={rouge_type!r} is unknown; expected one of {', '.join(ROUGE_TYPES)}")
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError("f1_weight, rouge_weight, bleu_weight and distinct_weight must be >= 0 "
                             "with a positive sum")
        if distinct_n < 1:
            raise ValueError(f"distinct_n={distinct_n!r} must be >= 1")
        self.weights = weights
        self.distinct_n = distinct_n
        self.distinct_key = f"distinct{distinct_n}"
        self.rouge_type = rouge_type
        self.reference_field = reference_field
        self.lowercase_bleu = lowercase_bleu
        self.use_answer_tag = use_answer_tag
        self.rouge_types = tuple(dict.fromkeys(("rouge1", "rougeL", rouge_type)))
        self.scorer = rouge_scorer.RougeScorer(list(self.rouge_types), use_stemmer=use_stemmer)

    def references(self, row: dict[str, Any]) -> list[str]:
        """The row's reference texts (blank entries of a list dropped). ValueError when the field is
        missing, None or blank: comparing against ``"None"`` or nothing would be a silent 0."""
        field = self.reference_field
        if field not in row:
            raise ValueError(f"row has no {field!r} (the reference text: text_similarity's reference_field)")
        reference = row[field]
        items = reference if isinstance(reference, (list, tuple)) else [reference]
        references = [str(r) for r in items if r is not None and str(r).strip()]
        if not references:
            raise ValueError(f"reference row[{field!r}]={reference!r} is empty")
        return references

    def __call__(self, completion: str, row: dict[str, Any]) -> dict[str, float]:
        import sacrebleu

        references = self.references(row)
        if self.use_answer_tag:
            tagged = last_tag_content(completion, "answer")
            completion = tagged.strip() if tagged is not None else completion
        f1 = max(token_f1(completion, ref) for ref in references)
        rouge = {t: 0.0 for t in self.rouge_types}
        for ref in references:
            for t, score in self.scorer.score(ref, completion).items():
                rouge[t] = max(rouge[t], float(score.fmeasure))
        bleu = sacrebleu.sentence_bleu(completion, references, lowercase=self.lowercase_bleu).score / 100.0
        bleu = min(max(bleu, 0.0), 1.0)  # sacrebleu can return 100.00000000000004
        distinct = distinct_n(completion, self.distinct_n)
        wf, wr, wb, wd = self.weights
        reward = (wf * f1 + wr * rouge[self.rouge_type] + wb * bleu + wd * distinct) / (wf + wr + wb + wd)
        return {"reward": reward, "f1": f1, **rouge, "bleu": bleu, self.distinct_key: distinct}
