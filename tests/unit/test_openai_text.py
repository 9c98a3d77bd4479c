"""The OpenAI-compatible API's text handling, without a server: incremental detokenization, stop
strings, and which parameters are refused (tests/integration/test_openai_api.py runs the API)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from schemas import openai as oa
from server.errors import InvalidRequest
from server.ops import openai_compat, text


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_token_pieces_join_to_the_decoded_text_and_never_split_a_character(tokenizer) -> None:
    rng = random.Random(0)
    words = ["héllo ", "wörld ", "日本語", "😀", "\n", "def f(x):", "<|im_end|>", "  "]
    for _ in range(100):
        tokens = tokenizer("".join(rng.choice(words) for _ in range(8)))["input_ids"]
        pieces = text.token_texts(tokenizer, tokens)
        assert len(pieces) == len(tokens)
        assert "".join(pieces) == tokenizer.decode(tokens, skip_special_tokens=True)
        assert not any(text.REPLACEMENT in p for p in pieces)


def test_random_ids_still_join_to_the_decoded_text(tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(100):
        tokens = [rng.randrange(tokenizer.vocab_size) for _ in range(12)]
        assert "".join(text.token_texts(tokenizer, tokens)) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_a_stop_string_cuts_the_text_and_the_tokens_after_it() -> None:
    pieces = ["He", "llo", " wor", "ld"]
    assert openai_compat._first_stop("Hello world", ("lo w", "xyz")) == 3
    assert openai_compat._cut(pieces, 3) == ["He", "l"]  # "llo" begins before the stop, so it stays, cut
    assert openai_compat._cut(pieces, 2) == ["He"]  # the stop begins where a token does
    assert openai_compat._cut(pieces, 0) == []
    assert openai_compat._first_stop("Hello", ("x",)) is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [({"tools": [{"type": "function"}]}, "tools"), ({"logit_bias": {"1": 5}}, "logit_bias"),
     ({"response_format": {"type": "json_object"}}, "response_format"), ({"presence_penalty": 1}, "presence_penalty"),
     ({"mystery": 3}, "mystery")],
)
def test_parameters_that_change_the_result_are_refused_by_name(extra: dict, field: str) -> None:
    req = oa.ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **extra})
    with pytest.raises(InvalidRequest) as err:
        openai_compat._refuse_unsupported(req)
    assert err.value.field == field


def test_harmless_and_neutral_parameters_pass() -> None:
    req = oa.ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "user": "u", "tools": [], "tool_choice": "none",
        "response_format": {"type": "text"}, "logit_bias": None, "frequency_penalty": 0, "metadata": {"a": "b"},
    })
    openai_compat._refuse_unsupported(req)
