"""Formats and tokenizing (qlora_fsdp.data.formats, .tokenize): format detection, prompt formats, and which
tokens train. References: the decoded text written out by hand, and the chat template's own {% generation %}
assistant mask."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset

from qlora_fsdp.data import (
    IGNORE_INDEX,
    DataError,
    detect_format,
    embedded_tokenizer,
    tokenize_dataset,
    tokenize_example,
)
from tests.data.examples import ROWS, trained_spans


def test_detect_format():
    assert detect_format(Dataset.from_list(ROWS)) == "instruction"
    assert detect_format(Dataset.from_list([{"instruction": "a", "output": "b"}])) == "instruction"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert detect_format(Dataset.from_list([{"messages": msgs}])) == "messages"
    assert detect_format(Dataset.from_list([{"prompt": "p", "completion": "c"}])) == "prompt_completion"
    assert detect_format(Dataset.from_list([{"text": "t", "meta": 1}])) == "text"
    assert detect_format({"text": "t"}) == "text"
    with pytest.raises(DataError) as e:
        detect_format(Dataset.from_list([{"question": "q", "answer": "a"}]))
    msg = str(e.value)
    assert "['answer', 'question']" in msg and "instruction+output" in msg and "messages" in msg and "\n" not in msg


def test_instruction_completion_only(tok):
    ex = {"instruction": "Reverse the word.", "input": "kitten", "output": "nettik"}
    t = tokenize_example(ex, tok, "instruction", 256, prompt_format="alpaca")
    assert tok.decode(t["input_ids"]) == (
        "<s>### Instruction:\nReverse the word.\n\n### Input:\nkitten\n\n### Response:\nnettik</s>"
    )
    assert [tok.decode(s) for s in trained_spans(t["input_ids"], t["labels"])] == ["nettik</s>"]
    # no input: no input block; completion_only=False trains on all but the first token
    ex = {"instruction": "What is 2 + 3?", "input": "", "output": "5"}
    t = tokenize_example(ex, tok, "instruction", 256, completion_only=False, prompt_format="alpaca")
    assert tok.decode(t["input_ids"]) == "<s>### Instruction:\nWhat is 2 + 3?\n\n### Response:\n5</s>"
    assert t["labels"] == [IGNORE_INDEX] + t["input_ids"][1:]
    # truncation
    t = tokenize_example(ex, tok, "instruction", 10)
    assert len(t["input_ids"]) == len(t["labels"]) == 10 and set(t["labels"]) == {IGNORE_INDEX}


CONVERSATION = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Reverse: abc"},
    {"role": "assistant", "content": "cba"},
    {"role": "user", "content": "Sort: cab"},
    {"role": "assistant", "content": "abc!"},
]


def test_messages_trains_on_assistant_replies(tok):
    t = tokenize_example({"messages": CONVERSATION}, tok, "messages", 512)
    assert [tok.decode(s) for s in trained_spans(t["input_ids"], t["labels"])] == ["cba</s>", "abc!</s>"]
    # the same positions as the template's own {% generation %} mask (an independent computation)
    ref = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert t["input_ids"] == ref["input_ids"]
    assert [lab != IGNORE_INDEX for lab in t["labels"]] == [bool(m) for m in ref["assistant_masks"]]


def test_messages_template_without_bos_or_markers(tok):
    tok = embedded_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    t = tokenize_example({"messages": CONVERSATION}, tok, "messages", 512)
    assert t["input_ids"][0] == tok.bos_token_id  # the template does not add it: prepended
    assert tok.decode(t["input_ids"][1:]).startswith("[system]Be terse.|[user]")
    assert [tok.decode(s) for s in trained_spans(t["input_ids"], t["labels"])] == ["cba|", "abc!|"]


def test_messages_fallback_when_history_renders_differently(tok, caplog):
    # earlier assistant turns are shortened in the history: their span in the full chat cannot be located
    tok = embedded_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{% if m['role'] == 'assistant' and not loop.last %}..."
        "{% else %}{{ m['content'] }}{% endif %}|{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    with caplog.at_level(logging.WARNING, logger="qlora_fsdp.data"):
        t = tokenize_example({"messages": CONVERSATION}, tok, "messages", 512)
    assert [tok.decode(s) for s in trained_spans(t["input_ids"], t["labels"])] == ["abc!|"]  # the last one only
    assert "cannot be located" in caplog.text and "{% generation %}" in caplog.text
    # with {% generation %} markers the template's own mask is used instead
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{% if m['role'] == 'assistant' %}{% generation %}"
        "{% if not loop.last %}...{% else %}{{ m['content'] }}{% endif %}|{% endgeneration %}"
        "{% else %}{{ m['content'] }}|{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    t = tokenize_example({"messages": CONVERSATION}, tok, "messages", 512)
    assert [tok.decode(s) for s in trained_spans(t["input_ids"], t["labels"])] == ["...|", "abc!|"]


def test_prompt_completion_and_text(tok):
    t = tokenize_example({"prompt": "2+3=", "completion": "5"}, tok, "prompt_completion", 64)
    assert tok.decode(t["input_ids"]) == "<s>2+3=5</s>"
    assert [tok.decode(s) for s in trained_spans(t["input_ids"], t["labels"])] == ["5</s>"]
    conv = {"prompt": CONVERSATION[:4], "completion": [CONVERSATION[4]]}
    t = tokenize_example(conv, tok, "prompt_completion", 512)
    assert [tok.decode(s) for s in trained_spans(t["input_ids"], t["labels"])] == ["abc!</s>"]
    t = tokenize_example({"text": "hello"}, tok, "text", 64)
    assert tok.decode(t["input_ids"]) == "<s>hello</s>"
    assert t["labels"] == [IGNORE_INDEX] + t["input_ids"][1:]


def test_prompt_formats(tok):
    """auto: the format the tokenizer names (the embedded one: alpaca, what its model learned), else the chat
    template where there is one (instruct models), else Alpaca (instructions) or the text as written
    (prompt/completion); chat, alpaca and raw are what they say; labels on the answer only."""
    import copy

    ex = {"instruction": "Reverse the word.", "input": "kitten", "output": "nettik"}
    alpaca = tokenize_example(ex, tok, "instruction", 256, prompt_format="alpaca")
    assert tok.decode(alpaca["input_ids"]).startswith("<s>### Instruction:")
    assert tokenize_example(ex, tok, "instruction", 256) == alpaca  # auto: named in tokenizer_config.json
    instruct = copy.deepcopy(tok)  # a tokenizer with a chat template that names no format
    instruct.init_kwargs.pop("prompt_format")
    turns = [{"role": "user", "content": "Reverse the word.\n\nkitten"}, {"role": "assistant", "content": "nettik"}]
    chat = tokenize_example(ex, tok, "instruction", 256, prompt_format="chat")
    assert chat == tokenize_example(ex, instruct, "instruction", 256)
    assert tok.decode(chat["input_ids"]) == tok.apply_chat_template(turns, tokenize=False)
    assert [tok.decode(s) for s in trained_spans(chat["input_ids"], chat["labels"])] == ["nettik</s>"]
    pc = tokenize_example({"prompt": "Reverse the word.", "completion": "drow"}, instruct, "prompt_completion", 256)
    assert tok.decode(pc["input_ids"]).startswith("<s><|user|>\nReverse the word.</s><|assistant|>\n")
    raw = tokenize_example(ex, tok, "instruction", 256, prompt_format="raw")
    assert tok.decode(raw["input_ids"]) == "<s>Reverse the word.\nkittennettik</s>"
    assert [tok.decode(s) for s in trained_spans(raw["input_ids"], raw["labels"])] == ["nettik</s>"]
    plain = copy.deepcopy(instruct)  # no chat template, no named format: a base model's tokenizer
    plain.chat_template = None
    assert tokenize_example(ex, plain, "instruction", 256) == alpaca
    pc = tokenize_example({"prompt": "2+3=", "completion": "5"}, plain, "prompt_completion", 64)
    assert tok.decode(pc["input_ids"]) == "<s>2+3=5</s>"
    for bad, fix in (("chat", "has no chat template: use --prompt-format alpaca or raw"), ("jinja", "use one of auto")):
        with pytest.raises(DataError, match=fix):
            tokenize_example(ex, plain, "instruction", 64, prompt_format=bad)


def test_tokenize_dataset_drops_and_errors(tok, caplog):
    rows = [
        {"instruction": "short", "input": "", "output": "ok"},
        {"instruction": "x" * 100, "input": "", "output": "lost"},  # the prompt fills max_length
        {"instruction": "y", "input": "z", "output": ""},
    ]
    with caplog.at_level(logging.WARNING, logger="qlora_fsdp.data"):
        ds = tokenize_dataset(Dataset.from_list(rows), tok, max_length=64)
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 2  # the empty output still trains on eos
    assert "dropped 1 of 3 examples with no trainable token within max_length=64" in caplog.text
    with pytest.raises(DataError) as e:
        tokenize_dataset(Dataset.from_list(rows[1:2]), tok, max_length=64)
    assert str(e.value) == (
        "no example has a trainable token within max_length=64: raise --max-length or check the fields"
    )
