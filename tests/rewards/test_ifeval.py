"""Tests for the IFEval reward (grpo_utils.rewards.ifeval): every instruction of the
official evaluation, strict and loose, on hand-written responses whose expected results
follow the official checkers (including their quirks), plus the 541 IFEval prompts."""

from __future__ import annotations

import json

import pytest

from grpo_utils.rewards.ifeval import (
    INSTRUCTION_IDS,
    build_checker,
    check_instructions,
    ifeval_reward,
    loose_variants,
    per_instruction_results,
)
from grpo_utils.rewards.ifeval._text import count_sentences, count_words, detect_language, word_tokens
from tests.helpers import SHARED_DATA

IFEVAL_DATA = SHARED_DATA / "ifeval" / "input_data.jsonl"

OFFICIAL_IDS = {
    "keywords:existence", "keywords:frequency", "keywords:forbidden_words", "keywords:letter_frequency",
    "language:response_language", "length_constraints:number_sentences", "length_constraints:number_paragraphs",
    "length_constraints:number_words", "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders", "detectable_content:postscript",
    "detectable_format:number_bullet_lists", "detectable_format:constrained_response",
    "detectable_format:number_highlighted_sections", "detectable_format:multiple_sections",
    "detectable_format:json_format", "detectable_format:title", "combination:two_responses",
    "combination:repeat_prompt", "startend:end_checker", "change_case:capital_word_frequency",
    "change_case:english_capital", "change_case:english_lowercase", "punctuation:no_comma", "startend:quotation",
}

FRENCH = "Bonjour, je m'appelle Marie et j'habite à Paris. J'aime beaucoup lire des livres le soir."

# (instruction id, kwargs, response, strict, loose)
CASES = [
    # keywords: regex matches, case-insensitive, no word boundaries (except forbidden words)
    ("keywords:existence", {"keywords": ["banana", "split"]}, "I ate a Banana SPLIT.", True, True),
    ("keywords:existence", {"keywords": ["banana", "split"]}, "I ate a banana.", False, False),
    ("keywords:existence", {"keywords": ["art"]}, "A smart start.", True, True),  # substring counts
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "Cat. cat! CAT?", True, True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "cat and dog and cat", False, False),
    ("keywords:frequency", {"keyword": "cat", "frequency": 3, "relation": "at least"}, "cat catalog scat", True, True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "one cat", True, True),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "cat, cat", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["apple", "pear"]}, "I like pineapple and pears.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["apple", "pear"]}, "An Apple a day.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["apple"]}, "Apple facts:\nFruit is good.", False, True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zig zag", True, True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zebra", False, False),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, "bread", True, True),
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}, "bAnAna", False, False),
    # a non-letter is counted as asked (the official code would check a random letter)
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}, "#fun #sun", True, True),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 2, "let_relation": "at least"}, "#fun sun", False, False),
    # language (langdetect, seeded); text it cannot classify counts as followed
    ("language:response_language", {"language": "fr"}, FRENCH, True, True),
    ("language:response_language", {"language": "fr"}, "Hello, my name is Mary and I live in London with my family.", False, False),
    ("language:response_language", {"language": "fr"}, "12345 678", True, True),
    # length
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One thing. Two things.", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two! Three?", False, False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "Dr. Smith came home. He slept.", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "Dr. Smith came home at 3 p.m. today.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First part.\n***\nSecond part.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "***\nFirst part.\n***\nSecond part.\n***", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n***\nSecond.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Just one paragraph here.", False, False),
    # loose drops the last line, and a divider with nothing after it ends the text
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.\n***\nThree.", False, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four", True, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four five", False, False),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "don't stop", True, True),  # don, t, stop
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "hi there", False, False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Weekend"},
     'Intro text.\n\n"Weekend, at last." said Ann.', True, True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "weekend"},
     "Intro text.\n\nMonday again.", False, False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "weekend"},
     "Intro.\n\nWeekend fun.\n\nMore.", False, True),  # three paragraphs; loose drops the last line
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "weekend"},
     "Intro.\n\n\n\nWeekend fun.", False, False),  # an empty paragraph still takes index 2
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "weekend"},
     "**Weekend** plans\n\nSecond paragraph.", False, True),  # bold first word: loose drops the *
    # detectable content
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] lives at [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] lives here.", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nP.S. See you soon.", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\np. s. see you", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\n\nPS see you", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S one more thing", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.S. one more thing", False, False),
    # detectable format
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* apples\n* pears", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**Fruit**\n* apples\n- pears", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* apples", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "*apples\n\n* pears", True, True),  # "*apples" counts too
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* apples\n* pears\n- that is all", False, True),
    ("detectable_format:constrained_response", {}, "Well... My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "My answer is Yes.", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** and *it*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "**bold** only", False, False),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "* * and *\nx*", False, False),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nIntro.\nSection 2\nBody.", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nIntro.\nSECTION 2\nBody.\nSECTION 3\nEnd.", True, True),  # at least
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "section 1\nIntro.\nsection 2\nBody.", False, False),  # case-sensitive
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', True, True),
    ("detectable_format:json_format", {}, '{"a": 1}', True, True),
    ("detectable_format:json_format", {}, '{"a": 1} and more', False, False),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}', False, True),
    ("detectable_format:title", {}, "<<Poem of Joy>>\nRoses are red.", True, True),
    ("detectable_format:title", {}, "<< >>\nRoses are red.", False, False),
    ("detectable_format:title", {}, "<Poem>\nRoses are red.", False, False),
    # combination
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True, True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False, False),
    ("combination:two_responses", {}, "One.\n******\n******\nTwo.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "write a POEM. Roses are red.", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure! Write a poem. Roses.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem."}, "Sure!\nWrite a poem. Roses.", False, True),
    # start / end
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, 'Done. Any other questions?"', True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Any other questions? Bye.", False, False),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. **Any other questions?**", False, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?\n(generated)", False, True),
    ("startend:quotation", {}, '  "Hello there."  ', True, True),
    ("startend:quotation", {}, 'Hello "there"', False, False),
    ("startend:quotation", {}, '"', False, False),
    ("startend:quotation", {}, '*"Hello there."*', False, True),
    ("startend:quotation", {}, 'Sure:\n"Hello there."', False, True),
    # change case
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "I DON'T know", True, True),  # I, DO, N'T
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "HELLO world FOO", False, False),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "HELLO well-known world", True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "WELL-KNOWN AND BIG", False, False),
    ("change_case:english_capital", {}, "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.", True, True),
    ("change_case:english_capital", {}, "This is an English sentence about the weather today.", False, False),
    ("change_case:english_capital", {}, "DER HUND SCHLÄFT IM HAUS UND DIE KATZE SITZT AUF DEM TISCH.", False, False),
    ("change_case:english_capital", {}, "Sure, here it is:\nTHIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.", False, True),
    ("change_case:english_lowercase", {}, "this is an english sentence about the weather today.", True, True),
    ("change_case:english_lowercase", {}, "This is an English sentence about the weather today.", False, False),
    ("change_case:english_lowercase", {}, "My Answer\nthis is an english sentence about the weather today.", False, True),
    # punctuation
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "Yes, commas.", False, False),
    ("punctuation:no_comma", {}, "Sure, here it is:\nno commas in this part", False, True),
    # a blank response follows nothing, not even "no commas"
    ("punctuation:no_comma", {}, "  \n ", False, False),
]


def test_instruction_ids_are_the_official_25():
    assert len(INSTRUCTION_IDS) == 25
    assert set(INSTRUCTION_IDS) == OFFICIAL_IDS


def test_every_instruction_has_a_followed_and_a_broken_case():
    followed = {case[0] for case in CASES if case[3]}
    broken = {case[0] for case in CASES if not case[3] and not case[4]}
    loose_only = {case[0] for case in CASES if case[4] and not case[3]}
    assert followed == OFFICIAL_IDS
    assert broken == OFFICIAL_IDS
    assert len(loose_only) >= 8


@pytest.mark.parametrize("instruction_id, kwargs, response, strict, loose", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_checker(instruction_id, kwargs, response, strict, loose):
    result = check_instructions(response, [instruction_id], [kwargs], prompt="unused prompt")
    assert result == {"strict": [strict], "loose": [loose]}


# ----------------------------------------------------------------------------- the IFEval data


def _ifeval_rows():
    if not IFEVAL_DATA.exists():
        pytest.skip(f"{IFEVAL_DATA} not present")
    rows = [json.loads(line) for line in IFEVAL_DATA.read_text().splitlines() if line.strip()]
    assert len(rows) == 541
    return rows


def test_every_ifeval_prompt_builds_and_scores():
    rows = _ifeval_rows()
    seen = set()
    for row in rows:
        assert len(row["instruction_id_list"]) == len(row["kwargs"])
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            assert instruction_id in INSTRUCTION_IDS, instruction_id
            build_checker(instruction_id, kwargs, row["prompt"])
            seen.add(instruction_id)
        scores = ifeval_reward("A short answer, not following much.", row)
        assert 0.0 <= scores["strict_fraction"] <= scores["loose_fraction"] <= 1.0
    assert seen == OFFICIAL_IDS


def test_repeating_the_prompt_follows_repeat_prompt_rows():
    rows = [r for r in _ifeval_rows() if "combination:repeat_prompt" in r["instruction_id_list"]]
    assert rows
    for row in rows:
        index = row["instruction_id_list"].index("combination:repeat_prompt")
        prompt = row["kwargs"][index]["prompt_to_repeat"]
        assert per_instruction_results(prompt + "\nMy answer.", row)[index]["strict"]
        assert not per_instruction_results("My answer.", row)[index]["loose"]


def test_null_kwargs_are_ignored():
    # Hugging Face copies of IFEval list every argument on every instruction, unused ones null
    nulls = {name: None for name in ("num_highlights", "relation", "num_words", "keywords", "language",
                                     "prompt_to_repeat", "let_frequency", "end_phrase")}
    row = {
        "prompt": "p",
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [dict(nulls), {**nulls, "relation": "at least", "num_words": 2}],
    }
    assert check_instructions("two words", row["instruction_id_list"], row["kwargs"], row["prompt"]) == {
        "strict": [True, True], "loose": [True, True]}
    # integral floats (a pandas round trip) and JSON-encoded kwargs are accepted
    assert build_checker("length_constraints:number_words", {"relation": "at least", "num_words": 2.0})("a b")
    assert build_checker("length_constraints:number_words", '{"relation": "at least", "num_words": 2}')("a b")


def test_repeat_prompt_falls_back_to_the_row_prompt():
    ids, kwargs = ["combination:repeat_prompt"], [{"prompt_to_repeat": None}]
    assert check_instructions("Write a poem. Roses.", ids, kwargs, prompt="Write a poem.")["strict"] == [True]
    assert check_instructions("Roses.", ids, kwargs, prompt="Write a poem.")["loose"] == [False]


@pytest.mark.parametrize("instruction_id, kwargs, message", [
    ("keywords:nonexistent", {}, "keywords:nonexistent"),
    ("length_constraints:number_words", {"num_words": 5}, "relation"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at most"}, "relation"),
    ("length_constraints:number_words", {"num_words": -1, "relation": "at least"}, "num_words"),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least", "extra": 1}, "extra"),
    ("keywords:existence", {"keywords": []}, "keywords"),
    ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1, "let_relation": "at least"}, "letter"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"},
     "nth_paragraph"),
    ("combination:repeat_prompt", {}, "prompt_to_repeat"),
])
def test_bad_instructions_raise(instruction_id, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_checker(instruction_id, kwargs)


# ----------------------------------------------------------------------------- reward

ROW = {
    "prompt": "Say something in quotes, without commas, in at least 5 words.",
    "instruction_id_list": ["punctuation:no_comma", "startend:quotation", "length_constraints:number_words"],
    "kwargs": [{}, {}, {"relation": "at least", "num_words": 5}],
}
# strict: comma in the preamble, not wrapped in quotes, 9 words -> only the word count is followed;
# loose: without the first line all three are followed
RESPONSE = 'Sure, here it is:\n"the quick brown fox jumps"'


def test_reward_fraction_and_all():
    scores = ifeval_reward(RESPONSE, ROW)
    assert scores == pytest.approx({"reward": 1 / 3, "correct": 0.0, "strict_fraction": 1 / 3,
                                    "loose_fraction": 1.0, "strict_all": 0.0, "loose_all": 1.0})
    assert ifeval_reward(RESPONSE, ROW, mode="all")["reward"] == 0.0
    assert ifeval_reward(RESPONSE, ROW, strictness="loose") == pytest.approx(
        {**scores, "reward": 1.0, "correct": 1.0})
    assert ifeval_reward(RESPONSE, ROW, mode="all", strictness="loose")["reward"] == 1.0
    perfect = ifeval_reward('"the quick brown fox jumps"', ROW, mode="all")
    assert perfect["reward"] == perfect["correct"] == perfect["strict_all"] == 1.0


def test_per_instruction_results():
    assert per_instruction_results(RESPONSE, ROW) == [
        {"instruction_id": "punctuation:no_comma", "strict": False, "loose": True},
        {"instruction_id": "startend:quotation", "strict": False, "loose": True},
        {"instruction_id": "length_constraints:number_words", "strict": True, "loose": True},
    ]


def test_reward_argument_errors():
    with pytest.raises(ValueError, match="mode"):
        ifeval_reward(RESPONSE, ROW, mode="sum")
    with pytest.raises(ValueError, match="strictness"):
        ifeval_reward(RESPONSE, ROW, strictness="lenient")
    with pytest.raises(ValueError, match="keywords:nope"):
        ifeval_reward(RESPONSE, {**ROW, "instruction_id_list": ["keywords:nope"], "kwargs": [{}]})
    with pytest.raises(ValueError, match="kwargs"):
        check_instructions(RESPONSE, ["punctuation:no_comma"], [{}, {}], prompt="")


# ----------------------------------------------------------------------------- text helpers


def test_loose_variants():
    assert loose_variants("*a*\nb\n*c*") == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"]


def test_sentence_and_word_counting_match_nltk():
    assert count_sentences("Dr. Smith went to Washington D.C. yesterday. He met Mr. Jones.") == 2
    assert count_sentences("Hi!!") == 2  # NLTK's Punkt leaves the last "!" on its own
    assert count_sentences("") == 0
    assert count_words("It's a well-known fact, isn't it?") == 9
    assert word_tokens("I DON'T like \"U.S.A.\" stuff.") == ["I", "DO", "N'T", "like", "``", "U.S.A.", "''", "stuff", "."]


def test_language_detection_is_deterministic():
    text = "Ok ciao"  # short and ambiguous: unseeded langdetect flips between languages
    assert len({detect_language(text) for _ in range(20)}) == 1
    assert detect_language(FRENCH) == "fr"
    assert detect_language("!!! 123") is None
