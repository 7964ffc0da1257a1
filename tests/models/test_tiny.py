"""Tests for grpo_utils.models.tiny: the locally built tokenizer and model survive save/reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_utils.models.tiny import CHAT_TEMPLATE, build_model, build_tokenizer, save_tiny

TEXTS = [
    "max 3 1 4 1 5",
    "  leading and  double  spaces, trailing   ",
    "line one\nline two\r\n\ttabbed\n\n",
    "12345678901234567890 -3.25 1,234 $5",
    "unicode: café naïve Ωμέγα 数学 😀 ∑x²",
    "<|im_start|> inside text <|im_end|> and <|endoftext|>",
]


def chat(tok, content, system=None):
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def reloaded_tok(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_tokenizer_special_tokens(tok):
    assert len(tok) == 259
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [258, 257]
    assert tok.eos_token_id == 257
    assert tok.chat_template == CHAT_TEMPLATE


def test_tokenizer_is_byte_level(tok):
    # one token per UTF-8 byte for ordinary text (no merges)
    for text in TEXTS[:5]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text
    # digits map to distinct tokens, so "12" is two tokens
    assert len({tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)}) == 10


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip_identical_ids(tok, reloaded_tok, text):
    for rendered in (text, chat(tok, text), chat(tok, text, system="Think step by step.\nThen answer.")):
        a = tok(rendered, add_special_tokens=False)["input_ids"]
        b = reloaded_tok(rendered, add_special_tokens=False)["input_ids"]
        assert a == b
        assert reloaded_tok.decode(b) == rendered
    assert chat(reloaded_tok, text) == chat(tok, text)


def test_reloaded_tokenizer_keeps_special_tokens_and_template(reloaded_tok):
    assert reloaded_tok.eos_token == "<|im_end|>"
    assert reloaded_tok.eos_token_id == 257
    assert reloaded_tok.pad_token == "<|endoftext|>" and reloaded_tok.pad_token_id == 0
    assert reloaded_tok.chat_template == CHAT_TEMPLATE
    assert len(reloaded_tok) == 259
    ids = reloaded_tok(chat(reloaded_tok, "max 1 2"), add_special_tokens=False)["input_ids"]
    assert ids[0] == 258 and ids.count(257) == 1  # <|im_start|> ... <|im_end|> are single special tokens
    assert reloaded_tok.decode(ids, skip_special_tokens=True) == "user\nmax 1 2\nassistant\n"


def test_model_config_matches_tokenizer(tok):
    model = build_model(tok, hidden_size=32, num_layers=1)
    cfg = model.config
    assert cfg.vocab_size == 259 and cfg.eos_token_id == 257 and cfg.pad_token_id == 0
    assert cfg.hidden_size == 32 and cfg.num_hidden_layers == 1 and cfg.intermediate_size == 64
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    # seeded: same seed same weights, different seed different weights
    same = build_model(tok, hidden_size=32, num_layers=1)
    other = build_model(tok, hidden_size=32, num_layers=1, seed=1)
    w = model.model.embed_tokens.weight
    assert torch.equal(w, same.model.embed_tokens.weight)
    assert not torch.equal(w, other.model.embed_tokens.weight)


def test_model_save_reload_identical_outputs(tok, tmp_path):
    model = build_model(tok, hidden_size=32, num_layers=1).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.tensor([tok(chat(tok, t), add_special_tokens=False)["input_ids"][:24] for t in TEXTS])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert not torch.isnan(model(ids).logits).any()


def test_save_tiny_writes_a_loadable_pair(tmp_path):
    path = save_tiny(tmp_path / "m", hidden_size=32, num_layers=1, seed=3)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert json.loads((path / "generation_config.json").read_text())["pad_token_id"] == 0
    tok2 = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ref = build_model(build_tokenizer(), hidden_size=32, num_layers=1, seed=3).eval()
    ids = torch.tensor([tok2(chat(tok2, "max 9 8 7"), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_building_the_quickstart_model_leaves_the_callers_rng_alone(tmp_path, monkeypatch):
    """The run that builds the cached quick-start model draws the same random numbers afterwards as
    a run that finds it (the same seed gives the same run, first time or not). The warm start is
    replaced by a few draws here (the real one takes ~20 s); the model's own init reseeds torch."""
    from grpo_utils.models import quickstart

    def draws(model, *args, **kwargs):
        torch.rand(1000)

    monkeypatch.setattr(quickstart, "warm_start", draws)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    path = quickstart.ensure_quickstart_model(tmp_path, verbose=False)
    assert (path / "config.json").is_file()
    assert torch.equal(torch.get_rng_state(), before)
