"""Text on the control plane: each base model's tokenizer, for the OpenAI-compatible API.

The Tinker API speaks token ids only; the OpenAI API speaks text, so the gateway tokenizes
prompts, renders chat templates and detokenizes samples itself. A tokenizer is loaded once per
base model (off the event loop) from the same folder the engine loads the model from.

Detokenization is incremental (`token_texts`, as text-generation-inference does it): a token's
piece of text is what it adds to the decoding of the tokens since the previous piece, held back
while that ends in an incomplete UTF-8 sequence, so a multi-byte character is never split across
two pieces and the pieces join to the decoded text.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.errors import InvalidRequest
from server.runtime import Runtime
from workers.base_models import resolve_base_model

Tokenizer = Any  # a transformers PreTrainedTokenizerBase (transformers is imported lazily: it costs seconds)
REPLACEMENT = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence
# Encoding may set a fast tokenizer's truncation and padding, which fails ("Already borrowed") while
# another thread uses it: encodings (short) take turns; decoding changes nothing and runs freely.
ENCODING_LOCK = threading.Lock()


async def tokenizer_for(rt: Runtime, base: str) -> Tokenizer:
    """The tokenizer of a served base model (a name `rt.served` has checked), loaded once."""
    return await asyncio.to_thread(_load, base, rt.data_dir, rt.settings.allow_download)


@functools.lru_cache(maxsize=16)
def _load(base: str, data_dir: Path, allow_download: bool) -> Tokenizer:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_base_model(base, data_dir, allow_download=allow_download)))


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt's ids, with the special tokens the tokenizer adds to a text (a BOS, for some)."""
    with ENCODING_LOCK:
        return list(tokenizer(text)["input_ids"])


def apply_chat_template(
    tokenizer: Tokenizer, base: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """The chat's ids as the base model's template renders them, by default ending with the
    assistant's turn begun. `template_kwargs` go to the template (tools, enable_thinking, ...)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            f"base model {base!r} has no chat template, so it cannot be chatted with: "
            "use /v1/completions with a prompt you format yourself",
            field="messages",
        )
    try:
        with ENCODING_LOCK:
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                    tokenize=True, return_dict=True, **template_kwargs)
    except Exception as exc:  # jinja's errors: a template that refuses these messages (roles, order)
        raise InvalidRequest(f"the chat template of {base!r} refused these messages: {exc}", field="messages") from None
    return list(encoded["input_ids"])


def token_texts(tokenizer: Tokenizer, tokens: Sequence[int]) -> list[str]:
    """Each token's piece of the decoded text (special tokens skipped); the pieces join to it.
    A token that completes nothing yet (part of a character) gets "" and the next one the rest."""
    tokens = list(tokens)
    pieces: list[str] = []
    # tokens[start:done] made the previous piece (the context a new piece is decoded in: a
    # space or a character can depend on what precedes it); tokens[done:] are pending.
    start = done = 0
    for end in range(1, len(tokens) + 1):
        before = _decode(tokenizer, tokens[start:done])
        text = _decode(tokenizer, tokens[start:end])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            pieces.append(text[len(before):])
            start, done = done, end
        else:
            pieces.append("")
    if done < len(tokens):  # an incomplete character at the end: it stays as decoding shows it
        pieces[-1] = _decode(tokenizer, tokens[start:])[len(_decode(tokenizer, tokens[start:done])):]
    return pieces


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """One token on its own, as logprobs name it (special tokens included)."""
    return tokenizer.decode([token], skip_special_tokens=False)


def _decode(tokenizer: Tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


def model_folder(rt: Runtime, base: str) -> Path:
    """The folder a served base model is loaded from (weights, config, tokenizer)."""
    return resolve_base_model(base, rt.data_dir, allow_download=rt.settings.allow_download)
