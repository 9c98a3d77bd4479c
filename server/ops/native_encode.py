"""Twinkle's `Template.encode` for one chat row (twinkle/template/base.py and utils.py, twinkle-kit
0.5.1), on the served base model's own tokenizer and chat template: what a server-side dataset's
`encode` makes (server/ops/native_data.py).

The steps, as Twinkle's:
1. the pre-pipeline: a default system turn for chats that begin with the user; an assistant's
   `<think>…</think>` moved to `reasoning_content` (always a string); text content as one string;
2. labels: a chat template that marks the assistant's tokens ({% generation %}) gives them;
   otherwise Twinkle's TokenizeByRound: assistant turn i trains the tokens from the end of
   `messages[:i]` rendered with the assistant's turn begun to the end of `messages[:i+1]` (its
   content and end-of-turn tokens); `user_data` key_rounds picks which turns train;
   with add_generation_prompt nothing trains;
3. max_length (truncation raise / left / right / delete), attention_mask, position_ids, length, and
   the labels rolled by one: labels[i] is the token predicted at position i.

One difference: the last label is always -100. Twinkle rolls (np.roll), which puts the first label
last; that is -100 for every chat, but a real token with use_chat_template=False or after a 'left'
truncation, where it would train the last position to predict the first token.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest
from server.ops import text

IGNORE = -100  # a label that trains nothing
TRUNCATIONS = ("raise", "left", "right", "delete")
MEDIA_KEYS = ("images", "videos", "audios")
Row = dict[str, Any]
Render = Callable[[list[dict[str, Any]], bool], list[int]]


@dataclass(frozen=True)
class DataTemplate:
    """A dataset's set_template: Twinkle's Template options, on a served base model's tokenizer."""

    base: str
    name: str = "Template"
    max_length: int | None = 8192  # Twinkle's default
    truncation_strategy: str = "raise"
    default_system: str | None = None
    enable_thinking: bool = True  # Twinkle passes it to every render
    use_chat_template: bool = True


def encode_row(tokenizer: text.Tokenizer, t: DataTemplate, row: Row, where: str, *,
               add_generation_prompt: bool = False) -> Row | None:
    """The row with its InputFeature (input_ids, labels, attention_mask, position_ids, length);
    None when the template drops it (truncation 'delete', or nothing rendered)."""
    ids, labels = tokens(tokenizer, t, row, where, add_generation_prompt)
    fitted = fit(t, ids, labels, where)
    if fitted is None or not fitted[0]:
        return None
    ids, labels = fitted
    n = len(ids)
    return {**row, "input_ids": ids, "labels": [*labels[1:], IGNORE], "attention_mask": [1] * n,
            "position_ids": list(range(n)), "length": n}


def tokens(tokenizer: text.Tokenizer, t: DataTemplate, row: Row, where: str, generation: bool
           ) -> tuple[list[int], list[int]]:
    """(input_ids, labels in input order: a token's own id where it trains)."""
    messages = chat(row, t, where)
    if not t.use_chat_template:
        return plain(tokenizer, messages, where)
    tools = row.get("tools") or []
    if not isinstance(tools, list):
        raise InvalidRequest("a list of tool definitions", field=f"{where}.tools")

    def render(msgs: list[dict[str, Any]], begin_assistant: bool) -> list[int]:
        try:
            return text.apply_chat_template(tokenizer, t.base, msgs, add_generation_prompt=begin_assistant,
                                            tools=tools, enable_thinking=t.enable_thinking)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, field=f"{where}.messages") from None

    if generation:
        ids = render(messages, True)
        return ids, [IGNORE] * len(ids)
    rounds = key_rounds(row)
    if rounds is None and supports_assistant_mask(tokenizer):
        return masked(tokenizer, t, messages, tools, where)
    return by_round(render, messages, rounds)


def by_round(render: Render, messages: list[dict[str, Any]], rounds: set[int] | None) -> tuple[list[int], list[int]]:
    """Twinkle's TokenizeByRound: each assistant turn trains what rendering it adds after its prefix."""
    full = render(messages, False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m.get("role") != "assistant" or (rounds is not None and i not in rounds):
            continue
        start = len(render(messages[:i], True))
        end = min(len(render(messages[: i + 1], False)), len(full))
        labels[start:end] = full[start:end]
    return full, labels


def plain(tokenizer: text.Tokenizer, messages: list[dict[str, Any]], where: str) -> tuple[list[int], list[int]]:
    """use_chat_template=False: one user message's text, every token trained (as Twinkle's)."""
    if len(messages) != 1 or messages[0].get("role") != "user" or not isinstance(messages[0].get("content"), str):
        raise InvalidRequest("without a chat template a row is one user message of text", field=f"{where}.messages")
    ids = text.encode(tokenizer, messages[0]["content"])
    return ids, list(ids)


def fit(t: DataTemplate, ids: list[int], labels: list[int], where: str) -> tuple[list[int], list[int]] | None:
    """Twinkle's max_length check (before the roll); None: the row is dropped."""
    m = t.max_length
    if not m or len(ids) <= m:
        return ids, labels
    if t.truncation_strategy == "raise":
        raise InvalidRequest(f"encodes to {len(ids)} tokens, over the template's max_length {m} (truncation_strategy "
                             "'raise'; 'left', 'right' or 'delete' shorten or drop such rows)", field=where)
    if t.truncation_strategy == "left":
        return ids[-m:], labels[-m:]
    if t.truncation_strategy == "right":
        return ids[:m], labels[:m]
    return None  # delete


# ----- the pre-pipeline ---------------------------------------------------------------------------
def chat(row: Row, t: DataTemplate, where: str) -> list[dict[str, Any]]:
    """The row's messages as Twinkle's pre-pipeline leaves them (copies: the row is not changed)."""
    raw = row.get("messages")
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise InvalidRequest("needs messages, a non-empty list of chat turns (map the rows to chats first, e.g. "
                             "map('AlpacaProcessor'))", field=f"{where}.messages")
    refuse_media(row, where)
    messages = [standard(m, f"{where}.messages[{j}]") for j, m in enumerate(raw)]
    if t.use_chat_template and t.default_system and messages[0].get("role") == "user":
        messages.insert(0, {"role": "system", "content": t.default_system})
    return messages


def refuse_media(row: Row, where: str) -> None:
    for holder, place in [(row, where), *((m, f"{where}.messages[{j}]") for j, m in enumerate(row["messages"]))]:
        for key in MEDIA_KEYS:
            if holder.get(key):
                raise InvalidRequest("is not supported: this server's base models are text-only",
                                     field=f"{place}.{key}")


def standard(message: dict[str, Any], where: str) -> dict[str, Any]:
    m = dict(message)
    if not isinstance(m.get("role"), str):
        raise InvalidRequest("needs a role", field=f"{where}.role")
    m["content"] = text_content(m.get("content"), where)
    if m["role"] == "assistant":
        m = reasoning(m)
    if "tool_calls" in m:
        m["tool_calls"] = tool_calls(m["tool_calls"], where)
    return m


def text_content(content: Any, where: str) -> Any:
    """Content blocks as one string (Twinkle takes text-only content to a string as well)."""
    if not isinstance(content, list):
        return content
    for k, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type", "text") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest("only text content is supported: this server's base models are text-only",
                                 field=f"{where}.content[{k}]")
    return "".join(block["text"] for block in content)


def reasoning(m: dict[str, Any]) -> dict[str, Any]:
    """Twinkle's _to_standard_reasoning_content: <think>…</think> into reasoning_content."""
    content = m.get("content", "")
    if "reasoning_content" not in m and isinstance(content, str) and "</think>" in content:
        m["reasoning_content"] = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        m["content"] = content.split("</think>")[-1].lstrip("\n")
    if not isinstance(m.get("reasoning_content"), str):
        m["reasoning_content"] = ""  # always a string, as Twinkle's (templates test it)
    return m


def tool_calls(calls: Any, where: str) -> Any:
    """Tool calls with their arguments as objects (Twinkle decodes JSON strings for the template)."""
    try:
        if isinstance(calls, str):
            calls = json.loads(calls) if calls else []
        if not calls:
            return calls
        out = []
        for call in calls:
            fn = call["function"]
            args = fn.get("arguments")
            decoded = args if isinstance(args, dict) else json.loads(args) if isinstance(args, str) and args.strip() else {}
            out.append({**call, "function": {**fn, "arguments": decoded}})
        return out
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InvalidRequest("tool calls are [{'function': {'name', 'arguments'}}] (arguments an object or its JSON)",
                             field=f"{where}.tool_calls") from None


def key_rounds(row: Row) -> set[int] | None:
    """The turns to train, from user_data ['key_rounds', '[1, 3]'] (Twinkle's user_data_get)."""
    items = row.get("user_data")
    if not isinstance(items, list):
        return None
    for entry in items:
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == "key_rounds":
            value = entry[1]
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    return None
            return set(value) if isinstance(value, list) and value else None
    return None


# ----- chat templates that mark the assistant's tokens ------------------------------------------
# tokenizer -> whether its template marks assistant tokens (weak: a dropped tokenizer's answer goes too)
_MASK_SUPPORT: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_DUMMY = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}]


def supports_assistant_mask(tokenizer: text.Tokenizer) -> bool:
    """Twinkle's test: the mask of a two-turn chat marks some tokens, not all."""
    if tokenizer not in _MASK_SUPPORT:
        try:
            out = _with_mask(tokenizer, _DUMMY, tools=None)
            mask = out.get("assistant_masks") if hasattr(out, "get") else None
            _MASK_SUPPORT[tokenizer] = mask is not None and 0 < sum(mask) < len(mask)
        except Exception:  # noqa: BLE001 - any failure means "not supported", as in Twinkle
            _MASK_SUPPORT[tokenizer] = False
    return _MASK_SUPPORT[tokenizer]


def masked(tokenizer: text.Tokenizer, t: DataTemplate, messages: list[dict[str, Any]], tools: list, where: str
           ) -> tuple[list[int], list[int]]:
    try:
        out = _with_mask(tokenizer, messages, tools=tools, enable_thinking=t.enable_thinking)
    except Exception as exc:  # noqa: BLE001 - jinja's errors: a template that refuses these messages
        raise InvalidRequest(f"the chat template of {t.base!r} refused these messages: {exc}",
                             field=f"{where}.messages") from None
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    return ids, [tok if keep else IGNORE for tok, keep in zip(ids, mask)]


def _with_mask(tokenizer: text.Tokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    # A fast tokenizer must not encode in two threads at once ("Already borrowed").
    with text.ENCODING_LOCK:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True, **kwargs)
