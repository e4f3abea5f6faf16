"""The Ollama Modelfile: a chat template that fits prefix + content + suffix per role becomes a Go
TEMPLATE whose pieces reproduce the Jinja template exactly; one that does not is left out (Ollama
then reads the template in the GGUF) with the reason."""

from __future__ import annotations

import copy

import pytest

from lorakit.export.ollama import ChatFormat, TemplateNotTranslatable, modelfile

LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set messages = messages[1:] %}"
          "{% else %}{% set sys = '' %}{% endif %}{% for message in messages %}{% if message['role'] == 'user' %}"
          "{{ '[INST] ' + (('<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n') if loop.first and sys else '') + message['content']"
          " + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' </s>' }}{% endif %}{% endfor %}")
CONVERSATIONS = [
    [{"role": "user", "content": "How long does the kettle take to boil?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "Thanks\nbye"}],
]


@pytest.fixture
def tokenizer(smol_tokenizer):
    return copy.deepcopy(smol_tokenizer)


def test_smollm2_chatml_with_its_default_system_message(tokenizer):
    fmt = ChatFormat.from_tokenizer(tokenizer)
    assert fmt.prefix["user"] == "<|im_start|>user\n" and fmt.suffix["assistant"] == "<|im_end|>\n"
    assert fmt.default_system.startswith("You are a helpful AI assistant named SmolLM")
    for messages in CONVERSATIONS:
        assert fmt.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)
    text = modelfile("./model.gguf", fmt, tokenizer.eos_token, 8192)
    assert 'PARAMETER stop "<|im_end|>"' in text and f'SYSTEM """{fmt.default_system}"""' in text
    assert '{{ if eq .Role "user" }}' not in text  # system branch comes first: "if" then "else if"
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text


@pytest.mark.parametrize("template,first_user_prefix", [(LLAMA3, "<|start_header_id|>user<|end_header_id|>\n\n"),
                                                        (ZEPHYR, "<|user|>\n")])
def test_other_template_families_reproduce_exactly(tokenizer, template, first_user_prefix):
    tokenizer.chat_template = template
    fmt = ChatFormat.from_tokenizer(tokenizer)
    assert fmt.prefix["user"] == first_user_prefix and fmt.default_system is None
    for messages in CONVERSATIONS:
        for generation in (True, False):
            assert fmt.render(messages, generation) == tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation)


def test_a_template_that_moves_the_system_message_is_not_translated(tokenizer):
    tokenizer.chat_template = LLAMA2
    with pytest.raises(TemplateNotTranslatable):
        ChatFormat.from_tokenizer(tokenizer)
    text = modelfile("./m.gguf", None, "</s>", 4096, template_note="the chat template does not translate")
    assert "TEMPLATE" not in text.replace("# no TEMPLATE", "") and 'PARAMETER stop "</s>"' in text


def test_adapter_modelfile_names_base_and_adapter():
    text = modelfile("/models/base.gguf", None, "</s>", 100000, adapter_line="./adapter.gguf")
    assert "FROM /models/base.gguf\nADAPTER ./adapter.gguf\n" in text and "PARAMETER num_ctx 8192" in text
