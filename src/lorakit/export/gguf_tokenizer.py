"""The tokenizer as GGUF metadata: vocabulary, merges, token kinds, special ids, chat template.

Written for byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM, Mistral Nemo),
llama.cpp's ``tokenizer.ggml.model = "gpt2"``: the vocabulary in id order, the merge list as
``"left right"`` strings in rank order, and a kind per token (1 normal, 3 control for special
added tokens, 4 user-defined for other added tokens, 5 unused for padding ids past the
tokenizer's end). SentencePiece tokenizers are refused: their scores and byte tokens need
llama.cpp's own converter.

``pre`` names llama.cpp's pre-tokenizer regex set. llama.cpp recognises it by hashing its
tokenizer's output on a test text, a table lorakit does not carry; the value is therefore taken
from the base model's own GGUF when the base came from one (the built-in model does), else from
the model type (``qwen2``) or ``default``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorakit.errors import LorakitError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
_PRE_BY_MODEL_TYPE = {"qwen2": "qwen2"}


@dataclass
class GGUFTokenizer:
    """Everything the writer puts under ``tokenizer.*``."""
    tokens: list[str]
    kinds: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None

    def write(self, writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.kinds)
        writer.add_token_merges(self.merges)
        for add, value in ((writer.add_bos_token_id, self.bos_id), (writer.add_eos_token_id, self.eos_id),
                           (writer.add_unk_token_id, self.unk_id), (writer.add_pad_token_id, self.pad_id)):
            if value is not None:
                add(int(value))
        writer.add_add_bos_token(bool(self.add_bos))
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def gguf_tokenizer(tokenizer, vocab_size: int, model_type: str, pre: str | None = None) -> GGUFTokenizer:
    """Read a transformers fast tokenizer into GGUF form; ``vocab_size`` (the model's embedding
    rows) pads the list with unused ids. LorakitError for tokenizers that are not byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LorakitError("GGUF export needs a fast (tokenizers) tokenizer; this one is a slow Python tokenizer")
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or not _byte_level(decoder):
        raise LorakitError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')} with a "
                           f"{decoder.get('type')} decoder (SentencePiece: use llama.cpp's convert_hf_to_gguf.py)")
    by_id = {index: token for token, index in model["vocab"].items()}
    kinds = {}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    kind_list = [kinds.get(i, NORMAL if i in by_id else UNUSED) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return GGUFTokenizer(tokens=tokens, kinds=kind_list, merges=merges,
                         pre=pre or _PRE_BY_MODEL_TYPE.get(model_type, "default"),
                         bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id,
                         unk_id=tokenizer.unk_token_id, pad_id=tokenizer.pad_token_id,
                         add_bos=bool(getattr(tokenizer, "add_bos_token", False)),
                         chat_template=_template_text(tokenizer))


def _byte_level(decoder: dict) -> bool:
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(d.get("type") == "ByteLevel" for d in decoder.get("decoders", []))


def _template_text(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is what chat uses
        template = template.get("default")
    return template


def pre_tokenizer_of_gguf(path) -> str | None:
    """``tokenizer.ggml.pre`` of an existing GGUF file, or None."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())
