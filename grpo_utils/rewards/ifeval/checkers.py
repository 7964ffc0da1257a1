"""The 25 IFEval instruction checkers (Zhou et al. 2023, "Instruction-Following Evaluation
for Large Language Models"), one class per instruction id.

Each checker is built from the row's kwargs for that instruction and called on a response:
``build_checker("keywords:existence", {"keywords": ["cat"]})("A cat.") -> True``.

Behaviour follows the official evaluation, including its quirks, so that scores are
comparable with published IFEval numbers: keywords are matched as (case-insensitive)
regular expressions and without word boundaries except for forbidden words, a postscript
marker may sit anywhere in the text, ``detectable_format:multiple_sections`` counts "at
least" sections, and an undetectable language counts as followed.

Where the official code would pick a *random* argument (a kwarg missing or out of range),
these checkers raise ``ValueError`` instead: a reward must be deterministic. The one data
case this touches is ``keywords:letter_frequency`` with a non-letter (two IFEval prompts
ask for ``#`` and ``!``): the official code silently checks a random letter, here the
character asked for is counted.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from grpo_utils.rewards.ifeval._text import count_sentences, count_words, detect_language, word_tokens

RELATIONS = ("less than", "at least")

_REGISTRY: dict[str, type[Checker]] = {}


def _register(instruction_id: str):
    def wrap(cls: type[Checker]) -> type[Checker]:
        cls.instruction_id = instruction_id
        _REGISTRY[instruction_id] = cls
        return cls

    return wrap


# ----------------------------------------------------------------------------- argument checks


def _count(instruction_id: str, name: str, value: Any) -> int:
    """A non-negative integer kwarg (integral floats and numpy integers accepted: JSON,
    pandas and Arrow round trips)."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{instruction_id}: {name} must be a non-negative integer, got {value!r}")
    return int(value)


def _relation(instruction_id: str, name: str, value: Any) -> str:
    if value not in RELATIONS:
        raise ValueError(f"{instruction_id}: {name} must be one of {RELATIONS}, got {value!r}")
    return value


def _string(instruction_id: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{instruction_id}: {name} must be a non-empty string, got {value!r}")
    return value


def _words(instruction_id: str, name: str, value: Any) -> list[str]:
    words = list(value) if isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping)) else []
    if not words:
        raise ValueError(f"{instruction_id}: {name} must be a non-empty list of strings, got {value!r}")
    return [_string(instruction_id, name, word) for word in words]


def _compare(actual: int, relation: str, threshold: int) -> bool:
    return actual < threshold if relation == "less than" else actual >= threshold


def _pattern(text: str, template: str = "{}", flags: int = re.IGNORECASE) -> re.Pattern[str]:
    """IFEval matches keywords and markers as regular expressions (``template`` wraps the
    text); text that does not compile as one is matched literally, where the official
    code would crash."""
    try:
        return re.compile(template.format(text), flags)
    except re.error:
        return re.compile(template.format(re.escape(text)), flags)


# ----------------------------------------------------------------------------- base


class Checker:
    """One instruction: built from its kwargs, called on a response."""

    instruction_id: ClassVar[str]
    #: kwargs the instruction takes (all required); None-valued kwargs are dropped first.
    arguments: ClassVar[tuple[str, ...]] = ()

    def __call__(self, response: str) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# ----------------------------------------------------------------------------- keywords


@_register("keywords:existence")
class KeywordsExist(Checker):
    """Every keyword appears (case-insensitive substring/regex match)."""

    arguments = ("keywords",)

    def __init__(self, keywords: Sequence[str]):
        self.keywords = _words(self.instruction_id, "keywords", keywords)
        self._patterns = [_pattern(word) for word in self.keywords]

    def __call__(self, response: str) -> bool:
        return all(p.search(response) for p in self._patterns)


@_register("keywords:frequency")
class KeywordFrequency(Checker):
    """The keyword occurs ``relation`` ``frequency`` times (case-insensitive, no word boundaries)."""

    arguments = ("keyword", "frequency", "relation")

    def __init__(self, keyword: str, frequency: int, relation: str):
        self.keyword = _string(self.instruction_id, "keyword", keyword).strip()
        self.frequency = _count(self.instruction_id, "frequency", frequency)
        self.relation = _relation(self.instruction_id, "relation", relation)
        self._pattern = _pattern(self.keyword)

    def __call__(self, response: str) -> bool:
        return _compare(len(self._pattern.findall(response)), self.relation, self.frequency)


@_register("keywords:forbidden_words")
class ForbiddenWords(Checker):
    """None of the words appears as a whole word (case-insensitive)."""

    arguments = ("forbidden_words",)

    def __init__(self, forbidden_words: Sequence[str]):
        self.forbidden_words = sorted(set(_words(self.instruction_id, "forbidden_words", forbidden_words)))
        self._patterns = [_pattern(word, r"\b{}\b") for word in self.forbidden_words]

    def __call__(self, response: str) -> bool:
        return not any(p.search(response) for p in self._patterns)


@_register("keywords:letter_frequency")
class LetterFrequency(Checker):
    """The letter (case-insensitive) occurs ``let_relation`` ``let_frequency`` times."""

    arguments = ("letter", "let_frequency", "let_relation")

    def __init__(self, letter: str, let_frequency: int, let_relation: str):
        letter = _string(self.instruction_id, "letter", letter).strip()
        if len(letter) != 1:
            raise ValueError(f"{self.instruction_id}: letter must be a single character, got {letter!r}")
        self.letter = letter.lower()
        self.let_frequency = _count(self.instruction_id, "let_frequency", let_frequency)
        self.let_relation = _relation(self.instruction_id, "let_relation", let_relation)

    def __call__(self, response: str) -> bool:
        return _compare(response.lower().count(self.letter), self.let_relation, self.let_frequency)


# ----------------------------------------------------------------------------- language


@_register("language:response_language")
class ResponseLanguage(Checker):
    """langdetect identifies the response as ``language`` (ISO 639-1); undetectable passes."""

    arguments = ("language",)

    def __init__(self, language: str):
        self.language = _string(self.instruction_id, "language", language).strip()

    def __call__(self, response: str) -> bool:
        detected = detect_language(response)
        return detected is None or detected == self.language


# ----------------------------------------------------------------------------- length


@_register("length_constraints:number_sentences")
class NumberOfSentences(Checker):
    """Punkt sentence count is ``relation`` ``num_sentences``."""

    arguments = ("num_sentences", "relation")

    def __init__(self, num_sentences: int, relation: str):
        self.num_sentences = _count(self.instruction_id, "num_sentences", num_sentences)
        self.relation = _relation(self.instruction_id, "relation", relation)

    def __call__(self, response: str) -> bool:
        return _compare(count_sentences(response), self.relation, self.num_sentences)


@_register("length_constraints:number_paragraphs")
class NumberOfParagraphs(Checker):
    """Exactly ``num_paragraphs`` paragraphs separated by the markdown divider ``***``.

    Empty text before the first or after the last divider is not a paragraph; an empty
    paragraph between two dividers fails the instruction."""

    arguments = ("num_paragraphs",)
    _DIVIDER = re.compile(r"\s?\*\*\*\s?")

    def __init__(self, num_paragraphs: int):
        self.num_paragraphs = _count(self.instruction_id, "num_paragraphs", num_paragraphs)

    def __call__(self, response: str) -> bool:
        parts = self._DIVIDER.split(response)
        last = len(parts) - 1
        count = 0
        for index, part in enumerate(parts):
            if part.strip():
                count += 1
            elif index not in (0, last):
                return False
        return count == self.num_paragraphs


@_register("length_constraints:number_words")
class NumberOfWords(Checker):
    """Word count (``\\w+`` runs) is ``relation`` ``num_words``."""

    arguments = ("num_words", "relation")

    def __init__(self, num_words: int, relation: str):
        self.num_words = _count(self.instruction_id, "num_words", num_words)
        self.relation = _relation(self.instruction_id, "relation", relation)

    def __call__(self, response: str) -> bool:
        return _compare(count_words(response), self.relation, self.num_words)


@_register("length_constraints:nth_paragraph_first_word")
class NthParagraphFirstWord(Checker):
    """Exactly ``num_paragraphs`` non-empty paragraphs separated by ``\\n\\n``, and paragraph
    ``nth_paragraph`` (1-based, counted over the raw split) starts with ``first_word``
    (case-insensitive; leading quotes dropped, the word cut at the first . , ? ! ' ")."""

    arguments = ("num_paragraphs", "nth_paragraph", "first_word")
    _CUT = frozenset(".,?!'\"")

    def __init__(self, num_paragraphs: int, nth_paragraph: int, first_word: str):
        self.num_paragraphs = _count(self.instruction_id, "num_paragraphs", num_paragraphs)
        self.nth_paragraph = _count(self.instruction_id, "nth_paragraph", nth_paragraph)
        if not 1 <= self.nth_paragraph <= self.num_paragraphs:
            raise ValueError(
                f"{self.instruction_id}: nth_paragraph must be in 1..num_paragraphs={self.num_paragraphs}, "
                f"got {self.nth_paragraph}"
            )
        self.first_word = _string(self.instruction_id, "first_word", first_word).lower()

    def __call__(self, response: str) -> bool:
        paragraphs = response.split("\n\n")
        count = sum(1 for p in paragraphs if p.strip())
        if self.nth_paragraph > count:
            return False
        paragraph = paragraphs[self.nth_paragraph - 1].strip()
        if not paragraph:
            return False
        word = paragraph.split()[0].lstrip("'").lstrip('"')
        first = []
        for char in word:
            if char in self._CUT:
                break
            first.append(char.lower())
        return count == self.num_paragraphs and "".join(first) == self.first_word


# ----------------------------------------------------------------------------- detectable content


@_register("detectable_content:number_placeholders")
class Placeholders(Checker):
    """At least ``num_placeholders`` square-bracket placeholders like ``[name]``."""

    arguments = ("num_placeholders",)
    _PLACEHOLDER = re.compile(r"\[.*?\]")

    def __init__(self, num_placeholders: int):
        self.num_placeholders = _count(self.instruction_id, "num_placeholders", num_placeholders)

    def __call__(self, response: str) -> bool:
        return len(self._PLACEHOLDER.findall(response)) >= self.num_placeholders


@_register("detectable_content:postscript")
class Postscript(Checker):
    """A postscript marker appears (case-insensitive, anywhere). ``P.S.`` also accepts
    ``p. s.``; ``P.P.S`` also accepts ``p. p. s``; another marker is matched as a regex."""

    arguments = ("postscript_marker",)

    def __init__(self, postscript_marker: str):
        self.postscript_marker = _string(self.instruction_id, "postscript_marker", postscript_marker).strip()
        if self.postscript_marker == "P.P.S":
            self._pattern = re.compile(r"p\.\s?p\.\s?s")
        elif self.postscript_marker == "P.S.":
            self._pattern = re.compile(r"p\.\s?s\.")
        else:
            self._pattern = _pattern(self.postscript_marker.lower(), flags=0)

    def __call__(self, response: str) -> bool:
        return self._pattern.search(response.lower()) is not None


# ----------------------------------------------------------------------------- detectable format


@_register("detectable_format:number_bullet_lists")
class BulletList(Checker):
    """Exactly ``num_bullets`` markdown bullet lines (starting with ``*`` or ``-``)."""

    arguments = ("num_bullets",)
    _STAR = re.compile(r"^\s*\*[^\*].*$", re.MULTILINE)
    _DASH = re.compile(r"^\s*-.*$", re.MULTILINE)

    def __init__(self, num_bullets: int):
        self.num_bullets = _count(self.instruction_id, "num_bullets", num_bullets)

    def __call__(self, response: str) -> bool:
        return len(self._STAR.findall(response)) + len(self._DASH.findall(response)) == self.num_bullets


@_register("detectable_format:constrained_response")
class ConstrainedResponse(Checker):
    """Contains one of "My answer is yes." / "My answer is no." / "My answer is maybe."."""

    OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")

    def __call__(self, response: str) -> bool:
        response = response.strip()
        return any(option in response for option in self.OPTIONS)


@_register("detectable_format:number_highlighted_sections")
class HighlightedSections(Checker):
    """At least ``num_highlights`` non-empty ``*highlighted*`` spans on one line.

    As officially counted: every ``*...*`` with text inside counts once, and every
    ``**...**`` with text inside counts once (so ``**bold**`` counts one)."""

    arguments = ("num_highlights",)
    _SINGLE = re.compile(r"\*[^\n\*]*\*")
    _DOUBLE = re.compile(r"\*\*[^\n\*]*\*\*")

    def __init__(self, num_highlights: int):
        self.num_highlights = _count(self.instruction_id, "num_highlights", num_highlights)

    def __call__(self, response: str) -> bool:
        singles = sum(1 for m in self._SINGLE.findall(response) if m.strip("*").strip())
        doubles = sum(1 for m in self._DOUBLE.findall(response) if m[2:-2].strip())
        return singles + doubles >= self.num_highlights


@_register("detectable_format:multiple_sections")
class MultipleSections(Checker):
    """At least ``num_sections`` sections headed ``<section_spliter> <number>`` (case-sensitive)."""

    arguments = ("section_spliter", "num_sections")

    def __init__(self, section_spliter: str, num_sections: int):
        self.section_spliter = _string(self.instruction_id, "section_spliter", section_spliter).strip()
        self.num_sections = _count(self.instruction_id, "num_sections", num_sections)
        self._pattern = _pattern(self.section_spliter, r"\s?{}\s?\d+\s?", flags=0)

    def __call__(self, response: str) -> bool:
        return len(self._pattern.split(response)) - 1 >= self.num_sections


@_register("detectable_format:json_format")
class JsonFormat(Checker):
    """The whole response parses as JSON, optionally inside a ``` / ```json fence."""

    def __call__(self, response: str) -> bool:
        text = response.strip()
        for fence in ("```json", "```Json", "```JSON", "```"):  # each removed in turn, as officially
            text = text.removeprefix(fence)
        text = text.removesuffix("```").strip()
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            return False
        return True


@_register("detectable_format:title")
class Title(Checker):
    """A non-empty title in double angular brackets, ``<<title>>``, on one line."""

    _TITLE = re.compile(r"<<[^\n]+>>")

    def __call__(self, response: str) -> bool:
        return any(m.lstrip("<").rstrip(">").strip() for m in self._TITLE.findall(response))


# ----------------------------------------------------------------------------- combination


@_register("combination:two_responses")
class TwoResponses(Checker):
    """Two different non-empty responses separated by ``******`` (an empty part is allowed
    only at either end)."""

    def __call__(self, response: str) -> bool:
        parts = response.split("******")
        last = len(parts) - 1
        answers = []
        for index, part in enumerate(parts):
            if part.strip():
                answers.append(part.strip())
            elif index not in (0, last):
                return False
        return len(answers) == 2 and answers[0] != answers[1]


@_register("combination:repeat_prompt")
class RepeatPrompt(Checker):
    """The response starts with ``prompt_to_repeat`` (case-insensitive, outer whitespace ignored).

    The row's prompt is used when ``prompt_to_repeat`` is absent."""

    arguments = ("prompt_to_repeat",)

    def __init__(self, prompt_to_repeat: str):
        self.prompt_to_repeat = _string(self.instruction_id, "prompt_to_repeat", prompt_to_repeat)
        self._prefix = self.prompt_to_repeat.strip().lower()

    def __call__(self, response: str) -> bool:
        return response.strip().lower().startswith(self._prefix)


# ----------------------------------------------------------------------------- start / end


@_register("startend:end_checker")
class EndPhrase(Checker):
    """Ends with ``end_phrase`` (case-insensitive; outer whitespace and double quotes ignored)."""

    arguments = ("end_phrase",)

    def __init__(self, end_phrase: str):
        self.end_phrase = _string(self.instruction_id, "end_phrase", end_phrase).strip()
        self._suffix = self.end_phrase.lower()

    def __call__(self, response: str) -> bool:
        return response.strip().strip('"').lower().endswith(self._suffix)


# ----------------------------------------------------------------------------- case


@_register("change_case:capital_word_frequency")
class CapitalWordFrequency(Checker):
    """Number of all-capital word tokens (``nltk.word_tokenize``, so ``DON'T`` is two) is
    ``capital_relation`` ``capital_frequency``."""

    arguments = ("capital_frequency", "capital_relation")

    def __init__(self, capital_frequency: int, capital_relation: str):
        self.capital_frequency = _count(self.instruction_id, "capital_frequency", capital_frequency)
        self.capital_relation = _relation(self.instruction_id, "capital_relation", capital_relation)

    def __call__(self, response: str) -> bool:
        capitals = sum(1 for token in word_tokens(response) if token.isupper())
        return _compare(capitals, self.capital_relation, self.capital_frequency)


@_register("change_case:english_capital")
class EnglishCapital(Checker):
    """All cased characters are upper case and the text is English (undetectable passes)."""

    def __call__(self, response: str) -> bool:
        if not response.isupper():
            return False
        detected = detect_language(response)
        return detected is None or detected == "en"


@_register("change_case:english_lowercase")
class EnglishLowercase(Checker):
    """All cased characters are lower case and the text is English (undetectable passes)."""

    def __call__(self, response: str) -> bool:
        if not response.islower():
            return False
        detected = detect_language(response)
        return detected is None or detected == "en"


# ----------------------------------------------------------------------------- punctuation


@_register("punctuation:no_comma")
class NoComma(Checker):
    """No ``,`` anywhere."""

    def __call__(self, response: str) -> bool:
        return "," not in response


@_register("startend:quotation")
class Quotation(Checker):
    """The whole response (outer whitespace ignored) is wrapped in double quotes."""

    def __call__(self, response: str) -> bool:
        text = response.strip()
        return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ----------------------------------------------------------------------------- building

#: The instruction ids of the official evaluation, in its registry order.
INSTRUCTION_IDS: tuple[str, ...] = tuple(_REGISTRY)


def clean_kwargs(kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """A row's kwargs for one instruction with None-valued keys dropped (Hugging Face
    copies of IFEval list every argument name on every instruction, unused ones null).
    A JSON-encoded dict is decoded first."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs.strip() else {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"instruction kwargs must be a dict, got {type(kwargs).__name__}")
    return {key: value for key, value in kwargs.items() if value is not None}


def build_checker(instruction_id: str, kwargs: Mapping[str, Any] | str | None = None,
                  prompt: str | None = None) -> Checker:
    """The checker for ``instruction_id`` configured by ``kwargs``.

    Raises ValueError naming an unknown instruction id, an unexpected kwarg, or a missing
    or invalid one. ``prompt`` stands in for ``prompt_to_repeat`` when that is absent."""
    cls = _REGISTRY.get(instruction_id)
    if cls is None:
        raise ValueError(
            f"unknown IFEval instruction id {instruction_id!r}; expected one of {', '.join(INSTRUCTION_IDS)}"
        )
    args = clean_kwargs(kwargs)
    if cls is RepeatPrompt and "prompt_to_repeat" not in args and prompt:
        args["prompt_to_repeat"] = prompt
    unexpected = sorted(set(args) - set(cls.arguments))
    if unexpected:
        raise ValueError(f"{instruction_id}: unexpected kwargs {unexpected}; it takes {list(cls.arguments)}")
    missing = [name for name in cls.arguments if name not in args]
    if missing:
        raise ValueError(f"{instruction_id}: missing kwargs {missing}")
    return cls(**args)
