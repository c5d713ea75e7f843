"""The embedded default task: its tokenizer offline, its dataset's answers recomputed from the questions, and
the shipped assets against a fresh build by tools/make_tiny_assets.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qlora_fsdp.data import detect_format, embedded_dataset, embedded_dir

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_tokenizer_offline(tok, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoTokenizer.from_pretrained(str(embedded_dir()))
    assert len(loaded) == len(tok) <= 512
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id}) == 4
    for text in ("Reverse the word.\nkitten", "What is 23 + 45?\t68", "Any ASCII: ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./"):
        ids = loaded.encode(text, add_special_tokens=False)
        assert len(ids) == len(text) and loaded.decode(ids) == text  # character level, lossless
    prompt = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nhi</s><|assistant|>\n"


def test_embedded_dataset():
    train, held_out = embedded_dataset("train"), embedded_dataset("eval")
    assert len(train) == 2000 and len(held_out) == 200
    assert detect_format(train) == "instruction"
    kinds = {"reverse": 0, "sort": 0, "last": 0}
    for ex in train.to_list() + held_out.to_list():  # every answer recomputed from its question
        if ex["instruction"] == "Reverse the word.":
            kinds["reverse"] += 1
            assert ex["output"] == ex["input"][::-1]
        elif ex["instruction"] == "Sort the letters.":
            kinds["sort"] += 1
            assert ex["output"] == "".join(sorted(ex["input"]))
        else:
            kinds["last"] += 1
            assert ex["instruction"] == "Give the last letter." and ex["output"] == ex["input"][-1]
    assert min(kinds.values()) >= 700
    key = lambda ex: (ex["instruction"], ex["input"])  # noqa: E731
    assert len({key(e) for e in train}) == 2000
    assert not {key(e) for e in train} & {key(e) for e in held_out}
    assert not {e["input"] for e in train} & {e["input"] for e in held_out}  # unseen words
    size = sum((embedded_dir() / name).stat().st_size for name in DATA_AND_TOKENIZER_FILES)
    assert size < 1_000_000


# What tools/make_tiny_assets.py writes (the folder also holds the embedded model, built elsewhere).
DATA_AND_TOKENIZER_FILES = (
    "train.jsonl", "eval.jsonl", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
)  # fmt: skip


def test_embedded_assets_rebuild_identically(tmp_path):
    spec = importlib.util.spec_from_file_location("make_tiny_assets", ROOT / "tools" / "make_tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    rebuilt = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    assert sorted(rebuilt) == sorted(DATA_AND_TOKENIZER_FILES)
    assert rebuilt == {name: (embedded_dir() / name).read_bytes() for name in DATA_AND_TOKENIZER_FILES}
