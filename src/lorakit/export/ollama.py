"""An Ollama ``Modelfile`` for an exported GGUF: FROM, TEMPLATE, SYSTEM, stop tokens, parameters.

Ollama's TEMPLATE is a Go template, the tokenizer's chat template is Jinja: no general
translation exists. Most chat templates, though, render every message as
``prefix[role] + content + suffix[role]`` after a fixed ``head`` and end with a generation
prompt (ChatML, Llama 3, Gemma, Phi-3, Zephyr...). ``ChatFormat.from_tokenizer`` finds those
pieces by rendering probe conversations with marker contents through the real template, then
*checks* the pieces by re-rendering several real conversations both ways; only a format that
reproduces the template exactly is written as a TEMPLATE. Otherwise the Modelfile has no
TEMPLATE (Ollama then reads the chat template stored in the GGUF) and the caller is told why.

A default system message that the template inserts when a chat has none (SmolLM2's "You are a
helpful AI assistant named SmolLM...") becomes the Modelfile's SYSTEM.
"""

from __future__ import annotations

from dataclasses import dataclass

_MARK = {"system": "\u27e6S\u27e7", "user": "\u27e6U\u27e7", "assistant": "\u27e6A\u27e7"}
_CHECKS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a color."}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}],
]


class TemplateNotTranslatable(Exception):
    """The chat template does not fit prefix + content + suffix per role."""


@dataclass
class ChatFormat:
    """head + per message (prefix[role] + content + suffix[role]) + generation prompt."""
    head: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None = None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The text the chat template would produce (used to check the pieces)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        body = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return self.head + body + (self.generation if add_generation_prompt else "")

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ChatFormat":
        """Pieces found by probing ``tokenizer``'s chat template; TemplateNotTranslatable when
        they do not reproduce it on the check conversations."""
        def render(messages, generation=False):
            try:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            except Exception as err:  # noqa: BLE001 - any template failure means "not translatable"
                raise TemplateNotTranslatable(f"the template fails on a probe conversation ({err})") from None

        S, U, A = (_MARK[r] for r in ("system", "user", "assistant"))
        sys_user = render([{"role": "system", "content": S}, {"role": "user", "content": U}])
        user_only = render([{"role": "user", "content": U}])
        user_asst = render([{"role": "user", "content": U}, {"role": "assistant", "content": A}])
        with_generation = render([{"role": "user", "content": U}], generation=True)
        if not with_generation.startswith(user_only):
            raise TemplateNotTranslatable("the generation prompt is not appended after the conversation")
        suffix_user = _after(user_only, U)
        suffix_system = _between(sys_user, S, U)
        suffix_asst = _after(user_asst, A)
        # the text between two contents is suffix[previous] + prefix[next]; split on the suffix
        # measured where that role's message ended the conversation
        prefix_user, suffix_system = _split_known_suffix(suffix_system, suffix_user)
        prefix_asst = _strip_prefix(_between(user_asst, U, A), suffix_user)
        before_system = sys_user[:sys_user.index(S)]
        before_user = user_only[:user_only.index(U)]
        head, prefix_system = _common_head(before_system, before_user, prefix_user, suffix_system)
        default_system = None
        rest = _strip_prefix(before_user, head)
        if rest != prefix_user:  # the template inserted a system message of its own
            block = _strip_suffix(rest, prefix_user)
            default_system = _strip_suffix(_strip_prefix(block, prefix_system), suffix_system)
        found = cls(head=head, prefix={"system": prefix_system, "user": prefix_user, "assistant": prefix_asst},
                    suffix={"system": suffix_system, "user": suffix_user, "assistant": suffix_asst},
                    generation=with_generation[len(user_only):], default_system=default_system)
        for messages in _CHECKS:
            for generation in (True, False):
                if found.render(messages, generation) != render(messages, generation):
                    raise TemplateNotTranslatable("its per-role pieces do not reproduce the template on a check "
                                                  "conversation")
        return found

    def go_template(self) -> str:
        """Ollama's TEMPLATE text (one line of actions, so no whitespace trimming touches the pieces)."""
        def lit(text: str) -> str:
            return text.replace("{{", '{{ "{{" }}')

        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{lit(self.prefix[role])}{{{{ .Content }}}}'
            f"{lit(self.suffix[role])}" for i, role in enumerate(("system", "user", "assistant")))
        return f"{lit(self.head)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{lit(self.generation)}"


def _after(text: str, mark: str) -> str:
    return text[text.index(mark) + len(mark):]


def _between(text: str, first: str, second: str) -> str:
    start = text.index(first) + len(first)
    return text[start:text.index(second, start)]


def _strip_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise TemplateNotTranslatable(f"expected {prefix!r} at the start of {text!r}")
    return text[len(prefix):]


def _strip_suffix(text: str, suffix: str) -> str:
    if not text.endswith(suffix):
        raise TemplateNotTranslatable(f"expected {suffix!r} at the end of {text!r}")
    return text[:len(text) - len(suffix)]


def _split_known_suffix(gap: str, suffix_user: str) -> tuple[str, str]:
    """(prefix[user], suffix[system]) from the gap between a system and a user content, taking
    the system suffix to be the user suffix (true of every template with this shape; the check
    conversations catch a template where it is not)."""
    if gap.startswith(suffix_user):
        return gap[len(suffix_user):], suffix_user
    raise TemplateNotTranslatable("the system message does not end like a user message")


def _common_head(before_system: str, before_user: str, prefix_user: str, suffix_system: str) -> tuple[str, str]:
    """(head, prefix[system]) with ``before_system`` = head + prefix[system]: the shortest head
    for which ``before_user`` is head + prefix[user], or head + a whole default system block
    (prefix[system] + text + suffix[system]) + prefix[user]."""
    for size in range(len(before_system) + 1):
        head, prefix_system = before_system[:size], before_system[size:]
        if not before_user.startswith(head):
            break
        rest = before_user[size:]
        if rest == prefix_user or (rest.startswith(prefix_system) and rest.endswith(suffix_system + prefix_user)
                                   and len(rest) >= len(prefix_system) + len(suffix_system) + len(prefix_user)):
            return head, prefix_system
    raise TemplateNotTranslatable("the text before the first message differs between chats with and without a "
                                  "system message")


def modelfile(from_line: str, fmt: ChatFormat | None, eos_token: str | None, context_length: int,
              adapter_line: str | None = None, template_note: str | None = None) -> str:
    """The Modelfile text."""
    lines = ["# written by lorakit export", f"FROM {from_line}"]
    if adapter_line:
        lines.append(f"ADAPTER {adapter_line}")
    if fmt is not None:
        lines.append(f'TEMPLATE """{fmt.go_template()}"""')
        if fmt.default_system is not None:
            lines.append(f'SYSTEM """{fmt.default_system}"""')
    elif template_note:
        lines.append(f"# no TEMPLATE: {template_note}; Ollama uses the chat template stored in the GGUF")
    stops = []
    if fmt is not None and fmt.suffix["assistant"].strip():
        stops.append(fmt.suffix["assistant"].strip())
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines.append(f"PARAMETER num_ctx {min(int(context_length), 8192)}")
    return "\n".join(lines) + "\n"
