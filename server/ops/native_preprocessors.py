"""The preprocessors and filters a server-side dataset's `map` / `filter` may name (the native
Twinkle API's processor app, server/ops/native_data.py).

twinkle_client sends a preprocessor by name only (a class or an instance cannot be serialised), and
Twinkle's server would import it, or load a hub plugin, and run it. Here nothing the client names
is imported or evaluated: each name is one of the functions below, which rewrite a row (a JSON
object) as Twinkle's class of that name does (twinkle/preprocessor/llm.py, twinkle-kit 0.5.1).
Their output columns are merged into the row, as `datasets.map` merges them there.

Twinkle ships no named filters; the three here are this server's, as is `ShareGPTProcessor`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.errors import InvalidRequest

Row = dict[str, Any]
MATH_SYSTEM = ("You are a helpful math assistant. Respond with only the final answer in the form \\boxed{...} "
               "and nothing else.")
GSM8K_SYSTEM = ("You are a helpful math assistant. Solve the problem step by step and put your final answer "
                "within \\boxed{}.")
COUNTDOWN_SYSTEM = ("You are a helpful assistant. You first thinks about the reasoning process in the mind and "
                    "then provides the user with the answer.")
COUNTDOWN_QUERY = """Using the numbers {nums}, create an equation that equals {target}.
You can use basic arithmetic operations (+, -, *, /) and each number can only be used once.
Show your work in <think> </think> tags. And return the final equation and answer in <answer> </answer> tags,
for example <answer> (1 + 2) / 3 * 4 = 4 </answer>."""
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Named:
    """A preprocessor or filter: its function and the init_args it takes (name -> default)."""

    fn: Callable[..., Any]
    params: dict[str, Any]
    doc: str


def msg(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def text_of(row: Row, key: str, where: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(f"needs a string column {key!r}", field=f"{where}.{key}")
    return value


# ----- Twinkle's preprocessors (twinkle/preprocessor/llm.py) --------------------------------------
def self_cognition(row: Row, where: str, model_name: str | None = None, model_author: str | None = None) -> Row:
    name, author = model_name or "twinkle robot", model_author or "twinkle lab"

    def fill(key: str) -> str:
        return text_of(row, key, where).replace("{{NAME}}", name).replace("{{AUTHOR}}", author)

    return {"messages": [msg("system", "You are a helpful assistant."), msg("user", fill("query")),
                         msg("assistant", fill("response"))]}


def alpaca(row: Row, where: str) -> Row:
    instruction, extra = row.get("instruction") or "", row.get("input") or ""
    output = row.get("output") or ""
    for key, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            raise InvalidRequest("must be a string (or null)", field=f"{where}.{key}")
    prompt = instruction if not extra else f"{instruction}\n{extra}"
    return {"messages": [msg("user", prompt), msg("assistant", output)]}


def competition_math(row: Row, where: str) -> Row:
    return {"messages": [msg("user", text_of(row, "problem", where)),
                         msg("assistant", text_of(row, "solution", where))]}


def competition_math_grpo(row: Row, where: str) -> Row:
    messages = [msg("system", MATH_SYSTEM), msg("user", text_of(row, "problem", where)), msg("assistant", "")]
    return {"messages": messages, "user_data": [["solution", text_of(row, "solution", where)]]}


def countdown(row: Row, where: str) -> Row:
    nums = row.get("nums", [])
    target = row.get("response", row.get("target", 0))
    query = COUNTDOWN_QUERY.format(nums=nums, target=target)  # str() of the values, as Twinkle's f-string
    return {"messages": [msg("system", COUNTDOWN_SYSTEM), msg("user", query)],
            "user_data": [{"target": target, "nums": nums}]}


def gsm8k(row: Row, where: str, system: str | None = None, add_assistant: bool = False) -> Row:
    answer = text_of(row, "answer", where, required=False)
    found = re.search(r"####\s*([\-\d,.]+)", answer)
    truth = found.group(1).replace(",", "").strip() if found else ""
    messages = [msg("system", GSM8K_SYSTEM if system is None else system), msg("user", text_of(row, "question", where))]
    if add_assistant:
        messages.append(msg("assistant", answer))
    return {"messages": messages, "user_data": [["ground_truth", truth]]}


# ----- this server's ------------------------------------------------------------------------------
def sharegpt(row: Row, where: str, column: str = "conversations", system: str | None = None) -> Row:
    """ShareGPT turns ({"from": "human"|"gpt"|"system", "value"}) as chat messages."""
    turns = row.get(column)
    if not isinstance(turns, list) or not turns:
        raise InvalidRequest("needs a non-empty list of ShareGPT turns", field=f"{where}.{column}")
    messages = [] if system is None else [msg("system", system)]
    for k, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise InvalidRequest(f"a turn is {{'from': one of {', '.join(SHAREGPT_ROLES)}, 'value': text}}",
                                 field=f"{where}.{column}[{k}]")
        messages.append(msg(role, turn["value"]))
    return {"messages": messages}


def has_assistant(row: Row, where: str) -> bool:
    """Keeps chats with an assistant turn that says something (what supervised training learns)."""
    messages = row.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and m.get("role") == "assistant" and m.get("content") for m in messages)


def non_empty(row: Row, where: str, columns: list[str] | None = None) -> bool:
    """Keeps rows whose named columns are present and neither null nor empty."""
    return all(row.get(c) not in (None, "", [], {}) for c in columns or [])


def short_enough(row: Row, where: str, max_length: int = 8192) -> bool:
    """Keeps encoded rows of at most max_length tokens."""
    if "input_ids" not in row:
        raise InvalidRequest("MaxLengthFilter counts tokens: call encode first", field="filter_func")
    return len(row["input_ids"]) <= max_length


PREPROCESSORS = {
    "SelfCognitionProcessor": Named(self_cognition, {"model_name": None, "model_author": None},
                                    "query/response with {{NAME}}/{{AUTHOR}} -> system, user, assistant"),
    "AlpacaProcessor": Named(alpaca, {}, "instruction/input/output -> user, assistant"),
    "CompetitionMathProcessor": Named(competition_math, {}, "problem/solution -> user, assistant"),
    "CompetitionMathGRPOProcessor": Named(competition_math_grpo, {}, "problem -> a prompt; solution in user_data"),
    "GSM8KProcessor": Named(gsm8k, {"system": None, "add_assistant": False}, "question/answer -> a prompt"),
    "CountdownProcessor": Named(countdown, {}, "nums/target -> a prompt"),
    "ShareGPTProcessor": Named(sharegpt, {"column": "conversations", "system": None}, "ShareGPT turns -> messages"),
}
FILTERS = {
    "HasAssistantFilter": Named(has_assistant, {}, "chats with a non-empty assistant turn"),
    "NonEmptyFilter": Named(non_empty, {"columns": None}, "rows whose columns are all non-empty"),
    "MaxLengthFilter": Named(short_enough, {"max_length": 8192}, "encoded rows of at most max_length tokens"),
}
PARAM_TYPES = {"model_name": (str, type(None)), "model_author": (str, type(None)), "system": (str, type(None)),
               "add_assistant": (bool,), "column": (str,), "columns": (list, type(None)), "max_length": (int,)}


def pick(table: dict[str, Named], name: Any, init_args: Any, field: str, what: str) -> Callable[[Row, str], Any]:
    """The named function with its init_args bound, each checked; a bad name lists the allowed ones."""
    if not isinstance(name, str) or name not in table:
        shown = repr(name) if isinstance(name, str) else f"a {type(name).__name__}"
        raise InvalidRequest(f"unknown {what} {shown}: name one of {', '.join(table)} (functions, classes and hub "
                             "plugins are not run here)", field=field)
    named = table[name]
    kwargs = _init_args(named, init_args)

    def run(row: Row, where: str) -> Any:
        return named.fn(row, where, **kwargs)

    return run


def _init_args(named: Named, init_args: Any) -> dict[str, Any]:
    if init_args is None:
        return {}
    if not isinstance(init_args, dict):
        raise InvalidRequest("an object of the preprocessor's arguments", field="init_args")
    for key, value in init_args.items():
        if key not in named.params:
            takes = ", ".join(named.params) or "no arguments"
            raise InvalidRequest(f"not an argument of this one (it takes {takes})", field=f"init_args.{key}")
        types = PARAM_TYPES[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise InvalidRequest(f"wrong type {type(value).__name__}", field=f"init_args.{key}")
    if isinstance(init_args.get("max_length"), int) and init_args["max_length"] < 1:
        raise InvalidRequest("must be at least 1", field="init_args.max_length")
    if init_args.get("columns") is not None and not all(isinstance(c, str) for c in init_args["columns"]):
        raise InvalidRequest("a list of column names", field="init_args.columns")
    return dict(init_args)
