"""Render conversations with the tokenizer's chat template and find the assistant tokens.

Fallback template, used when ``tokenizer.chat_template`` is empty (also by inference, through
``render_chat``, so training and generation see the same text)::

    {bos_token}                                   (only when the tokenizer has one)
    ### System:\\n{content}\\n\\n                    (per system message)
    ### User:\\n{content}\\n\\n                      (per user message)
    ### Assistant:\\n{content}{eos_token}\\n\\n       (per assistant message)
    ### Assistant:\\n                              (the generation prompt)

Label spans. For every assistant message i the conversation is rendered twice more: the
messages before it with the generation prompt (text P_i), and the messages up to and
including it (text E_i). P_i and E_i must be prefixes of the full rendering; the assistant
span is the characters [len(P_i), len(E_i.rstrip())): the reply plus the template's
end-of-turn token, without the whitespace the template puts after it. The full text is
tokenized once (no extra special tokens: the template has them) and a token is labelled when
its first character lies inside a span (character offsets from the fast tokenizer).
"""

from __future__ import annotations

from lorakit.data.readers import BadRow
from lorakit.errors import LorakitError

IGNORE_INDEX = -100
_FALLBACK_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


def _fallback_render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    parts = [tokenizer.bos_token or ""]
    for message in messages:
        eos = (tokenizer.eos_token or "") if message["role"] == "assistant" else ""
        parts.append(f"{_FALLBACK_HEADERS[message['role']]}{message['content']}{eos}\n\n")
    if add_generation_prompt:
        parts.append(_FALLBACK_HEADERS["assistant"])
    return "".join(parts)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's chat template, or the fallback above."""
    if not getattr(tokenizer, "chat_template", None):
        return _fallback_render(tokenizer, messages, add_generation_prompt)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises for conversations a template refuses (e.g. roles not alternating)
        raise BadRow(f"the chat template rejects this conversation ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def assistant_char_spans(tokenizer, messages: list[dict], label_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character span of each assistant reply + end-of-turn]) for the
    assistant messages at index >= ``label_from`` (earlier turns are context, e.g. few-shot examples)."""
    text = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < label_from:
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise BadRow(f"the chat template does not render turn {i + 1} as a prefix of the whole "
                         f"conversation, so the assistant tokens cannot be located; use train_on_prompt: true")
        spans.append((len(prompt), max(len(prompt), len(upto.rstrip()))))
    return text, spans


def _token_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise LorakitError("masking prompt tokens needs a fast tokenizer (character offsets); load the "
                           "tokenizer with use_fast=True or set data.train_on_prompt: true") from None
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def tokenize_conversation(tokenizer, messages: list[dict], train_on_prompt: bool,
                          label_from: int = 0) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation; labels are IGNORE_INDEX outside assistant spans
    (of messages from index ``label_from`` on) unless ``train_on_prompt``."""
    if train_on_prompt and label_from == 0:
        ids = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
        return list(ids), list(ids)
    text, spans = assistant_char_spans(tokenizer, messages, label_from)
    ids, offsets = _token_offsets(tokenizer, text)
    labels = [token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
              for token, (start, _end) in zip(ids, offsets)]
    return ids, labels


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of plain text: the tokenizer's own special tokens (e.g. BOS), then
    EOS appended when the tokenizer has one, so the model learns where a document ends; all
    tokens labelled."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, list(ids)
