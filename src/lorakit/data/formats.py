"""Row formats -> a conversation (a list of {"role", "content"}) or a plain text.

    alpaca             {"instruction", "input"?, "output", "system"?}
                       -> [system?] user: instruction (+ "\\n\\n" + input when non-empty), assistant: output
    chat               {"messages": [{"role": system|user|assistant, "content": str}, ...]}
    sharegpt           {"conversations": [{"from": human|user|gpt|assistant|system, "value": str}, ...]}
    prompt_completion  {"prompt", "completion", "system"?} -> [system?] user: prompt, assistant: completion
    text               {"text"}: every token is trained on
    preference         {"prompt", "chosen", "rejected", "system"?}: a pair of answers to one prompt
                       (lorakit.data.preference; for the dpo / ipo / orpo / simpo objectives)
    kto                {"prompt", "completion", "label"}: one answer marked desirable (true) or not

``format: auto`` picks the first format whose keys the first row has, in the order
messages, conversations, instruction+output, prompt+chosen+rejected, prompt+completion+label,
prompt+completion, text.
"""

from __future__ import annotations

from lorakit.data.readers import BadRow
from lorakit.errors import lone_surrogate_at

_DETECT = (("chat", ("messages",)), ("sharegpt", ("conversations",)), ("alpaca", ("instruction", "output")),
           ("preference", ("prompt", "chosen", "rejected")), ("kto", ("prompt", "completion", "label")),
           ("prompt_completion", ("prompt", "completion")), ("text", ("text",)))
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def detect_format(row: dict, where: str) -> str:
    """The format whose required keys ``row`` has; BadRow naming the keys otherwise (a bad row
    like any other: ``skip_bad_rows`` skips it and the next row decides the format)."""
    for name, keys in _DETECT:
        if all(key in row for key in keys):
            return name
    expected = "; ".join(f"{name}: {'+'.join(keys)}" for name, keys in _DETECT)
    raise BadRow(f"cannot detect the data format from keys {sorted(map(str, row))}; expected one of "
                 f"({expected}), or set data.format")


def _text_field(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise BadRow(f"missing or empty field '{key}'")
        return ""
    if not isinstance(value, str):
        raise BadRow(f"field '{key}' must be a string, got {type(value).__name__}")
    _check_encodable(value, f"field '{key}'")
    return value


def _check_encodable(text: str, what: str) -> None:
    position = lone_surrogate_at(text)
    if position is not None:  # JSON's "\ud800" escapes decode to one; no tokenizer takes it
        raise BadRow(f"{what} is not valid Unicode (lone surrogate at character {position + 1})")


def _with_system(row: dict, turns: list[dict]) -> list[dict]:
    system = _text_field(row, "system", required=False)
    return ([{"role": "system", "content": system}] if system else []) + turns


def _messages(row: dict, key: str, role_key: str, content_key: str, role_map: dict,
              need_assistant: bool = True) -> list[dict]:
    turns = row.get(key)
    if not turns:
        raise BadRow(f"missing or empty field '{key}'")
    if not isinstance(turns, list):
        raise BadRow(f"field '{key}' must be a list of turns, got {type(turns).__name__}")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise BadRow(f"{key}[{number}] must be an object with '{role_key}' and '{content_key}'")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in role_map:
            raise BadRow(f"{key}[{number}] has unknown {role_key} {role!r}; valid: {', '.join(role_map)}")
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            raise BadRow(f"{key}[{number}] has a missing or empty '{content_key}'")
        _check_encodable(content, f"{key}[{number}].{content_key}")
        messages.append({"role": role_map[role], "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadRow(f"field '{key}' has no assistant turn to learn from")
    return messages


def row_to_example(row: dict, fmt: str) -> list[dict] | str:
    """A conversation (list of messages) for chat-like formats, a string for ``text``;
    raises BadRow for missing / empty fields and unknown roles."""
    if fmt == "text":
        return _text_field(row, "text")
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction")
        extra = _text_field(row, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return _with_system(row, [{"role": "user", "content": user},
                                  {"role": "assistant", "content": _text_field(row, "output")}])
    if fmt == "prompt_completion":
        return _with_system(row, [{"role": "user", "content": _text_field(row, "prompt")},
                                  {"role": "assistant", "content": _text_field(row, "completion")}])
    if fmt == "chat":
        return _messages(row, "messages", "role", "content", {r: r for r in ROLES})
    if fmt == "sharegpt":
        return _messages(row, "conversations", "from", "value", SHAREGPT_ROLES)
    raise ValueError(f"unknown format {fmt}")
