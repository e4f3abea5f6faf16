"""Labels are -100 exactly on the prompt tokens, checked token by token."""

from helpers import labelled_runs, write_jsonl
from lorakit.data import IGNORE_INDEX, DataConfig, build_datasets, render_chat

MULTI_TURN = {"messages": [
    {"role": "system", "content": "You answer questions about the Zorblax 3000."},
    {"role": "user", "content": "How do I reset it?"},
    {"role": "assistant", "content": "Hold the blue button for 10 seconds."},
    {"role": "user", "content": "And then?"},
    {"role": "assistant", "content": "Wait until the light blinks twice,\nthen release it."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": " You're welcome. "},
]}
ASSISTANT = [m["content"] for m in MULTI_TURN["messages"] if m["role"] == "assistant"]


def _build(tmp_path, tokenizer, rows, **kw):
    return build_datasets(DataConfig(train=write_jsonl(tmp_path / "c.jsonl", rows), **kw), tokenizer)


def test_multi_turn_labels_token_by_token(tmp_path, smol_tokenizer):
    train, _, _ = _build(tmp_path, smol_tokenizer, [MULTI_TURN])
    sample = train[0]
    assert sample["input_ids"] == smol_tokenizer(render_chat(smol_tokenizer, MULTI_TURN["messages"]),
                                                 add_special_tokens=False)["input_ids"]
    # every assistant turn is labelled: its content and the end-of-turn token, nothing else
    assert [smol_tokenizer.decode(run) for run in labelled_runs(sample)] == [c + "<|im_end|>" for c in ASSISTANT]
    # and every unlabelled token is prompt: decoding them gives the conversation minus the replies
    prompt = smol_tokenizer.decode([t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab == IGNORE_INDEX])
    full = render_chat(smol_tokenizer, MULTI_TURN["messages"])
    for content in ASSISTANT:
        full = full.replace(content + "<|im_end|>", "", 1)
    assert prompt == full
    # token by token, independently of the library: a token is labelled iff it lies between the
    # "<|im_start|>assistant\n" header and the next <|im_end|> (inclusive)
    start, end = smol_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    expected, state, header = [], "prompt", []
    for token in sample["input_ids"]:
        expected.append(token if state == "reply" else IGNORE_INDEX)
        if token == start:
            state, header = "header", []
        elif state == "header":
            header.append(token)
            if smol_tokenizer.decode(header).endswith("\n"):
                state = "reply" if smol_tokenizer.decode(header) == "assistant\n" else "prompt"
        elif token == end:
            state = "prompt"
    assert expected.count(IGNORE_INDEX) < len(expected) - 10
    assert sample["labels"] == expected


def test_train_on_prompt_labels_everything(tmp_path, smol_tokenizer):
    train, _, stats = _build(tmp_path, smol_tokenizer, [MULTI_TURN], train_on_prompt=True)
    assert train[0]["labels"] == train[0]["input_ids"]
    assert stats.train_label_tokens == stats.train_tokens == len(train[0]["input_ids"])


def test_fallback_template_without_chat_template(tmp_path, smol_tokenizer):
    import copy

    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.chat_template = None
    messages = MULTI_TURN["messages"][:3]
    text = render_chat(tokenizer, messages)
    assert text == ("<|im_start|>### System:\nYou answer questions about the Zorblax 3000.\n\n"
                    "### User:\nHow do I reset it?\n\n"
                    "### Assistant:\nHold the blue button for 10 seconds.<|im_end|>\n\n")
    assert render_chat(tokenizer, messages[:2], add_generation_prompt=True).endswith("### User:\nHow do I reset it?"
                                                                                    "\n\n### Assistant:\n")
    train, _, _ = _build(tmp_path, tokenizer, [{"messages": messages}])
    assert [tokenizer.decode(r) for r in labelled_runs(train[0])] == [ASSISTANT[0] + "<|im_end|>"]
