"""Held-out exact match for any dataset with reference answers (training/evaluate.py): the prompt is what training
saw before the answer, the reference the last trained span; and through the CLI on a dataset of our own."""

import json

import datasets
import pytest

from qlora_fsdp.cli import main
from qlora_fsdp.data import embedded_tokenizer, format_instruction_prompt, tokenize_example
from qlora_fsdp.training.evaluate import group_field, prompt_and_reference


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


def test_an_instructions_prompt_and_reference_are_what_training_sees(tok):
    example = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}
    prompt, reference = prompt_and_reference(example, tok, "instruction", 256, "alpaca")
    alpaca = format_instruction_prompt("Reverse the word.", "abc")
    assert prompt == [tok.bos_token_id] + tok(alpaca, add_special_tokens=False).input_ids
    assert reference == tok("cba", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert prompt_and_reference(example, tok, "instruction", 256) == (prompt, reference)  # auto: what tok names
    # chat: one user turn, the answer as the assistant's
    prompt, reference = prompt_and_reference(example, tok, "instruction", 256, "chat")
    user = [{"role": "user", "content": "Reverse the word.\n\nabc"}]
    assert tok.decode(prompt) == tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert tok.decode(reference, skip_special_tokens=True).strip() == "cba"


def test_a_conversations_reference_is_its_last_assistant_turn(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "abc?"}, {"role": "assistant", "content": "cba"}]  # fmt: skip
    prompt, reference = prompt_and_reference({"messages": messages}, tok, "messages", 512)
    full = tokenize_example({"messages": messages}, tok, "messages", 512)["input_ids"]
    assert prompt + reference == full[: len(prompt) + len(reference)]
    assert tok.decode(reference, skip_special_tokens=True).strip() == "cba"
    assert "yo" in tok.decode(prompt)
    assert prompt_and_reference({"text": "abc"}, tok, "text", 64) is None


def test_groups_only_where_values_repeat():
    assert group_field(datasets.Dataset.from_list([{"kind": "a", "prompt": "x"}, {"kind": "a", "prompt": "y"}])) == "kind"
    assert group_field(datasets.Dataset.from_list([{"kind": "a", "prompt": "x"}, {"kind": "b", "prompt": "y"}])) is None


def test_the_cli_reports_exact_match_on_any_dataset_with_answers(tmp_path, capsys):
    rows = [{"prompt": f"{w}>", "completion": w[::-1], "kind": "reverse"} for w in ["ab", "cd", "ef", "gh"] * 10]
    rows += [{"prompt": f"{w}=", "completion": w, "kind": "copy"} for w in ["ab", "cd", "ef", "gh"] * 10]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "task.jsonl"), "--eval-fraction", "0.2", "--max-steps", "3",
                 "--batch-size", "8", "--output-dir", str(out), "--device", "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "held-out exact match (16 examples)" in printed
    result = json.loads((out / "eval.json").read_text())
    assert result["group_by"] == "kind" and set(result["by_group"]) == {"reverse", "copy"}
    assert sum(g["examples"] for g in result["by_group"].values()) == 16
