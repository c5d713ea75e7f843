"""Tests of the data layer (qlora_fsdp.data) and the embedded default task; CPU, a few seconds.

References: packed batches against a tiny random LlamaForCausalLM run one example at a time (unpacked); masks
against the chat template's own {% generation %} assistant mask; dataset outputs recomputed from their inputs;
the shipped assets against a fresh build by tools/make_tiny_assets.py.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from qlora_fsdp.data import (
    IGNORE_INDEX,
    Batcher,
    DataError,
    detect_format,
    embedded_dataset,
    embedded_dir,
    embedded_tokenizer,
    load_examples,
    tokenize_dataset,
    tokenize_example,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = "ab cde fgh ijkl mnop".split()
ROWS = [{"instruction": f"Reverse the word {i}.", "input": w, "output": w[::-1]} for i, w in enumerate(WORDS)]


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.fixture(scope="module")
def train_raw():
    return embedded_dataset("train")


def _trained_spans(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of positions whose label is not -100, as lists of label ids."""
    spans, run = [], []
    for t, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if run:
                spans.append(run)
            run = []
        else:
            assert lab == t, "an unmasked label must equal its input id"
            run.append(lab)
    return spans + ([run] if run else [])


# ------------------------------------------------------------------------------------------------------ loading


def _write(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".parquet", ".csv"])
def test_load_local_file_and_slice(tmp_path, ext):
    path = tmp_path / f"data{ext}"
    _write(path, ROWS)
    assert load_examples(str(path)).to_list() == ROWS
    assert load_examples(str(path), "train[:3]").to_list() == ROWS[:3]
    assert load_examples(str(path), "train[-2:]").to_list() == ROWS[-2:]


def test_load_folder_by_split_name(tmp_path):
    _write(tmp_path / "train.jsonl", ROWS[:4])
    _write(tmp_path / "eval.jsonl", ROWS[4:])
    (tmp_path / "tokenizer.json").write_text("{}")  # a folder may hold other json files: never read as data
    assert load_examples(str(tmp_path)).to_list() == ROWS[:4]
    assert load_examples(str(tmp_path), "eval").to_list() == ROWS[4:]
    with pytest.raises(DataError, match=r"split 'test' not found in .*: pass one of \['eval', 'train'\]"):
        load_examples(str(tmp_path), "test")


def test_load_saved_to_disk(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert load_examples(str(tmp_path / "single"), "train[1:3]").to_list() == ROWS[1:3]
    from datasets import DatasetDict

    splits = DatasetDict({"train": Dataset.from_list(ROWS[:3]), "eval": Dataset.from_list(ROWS[3:])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_examples(str(tmp_path / "dict"), "eval").to_list() == ROWS[3:]
    with pytest.raises(DataError, match=r"split 'test' not found in .*: pass one of \['eval', 'train'\]"):
        load_examples(str(tmp_path / "dict"), "test")


def test_missing_file_error():
    with pytest.raises(DataError) as e:
        load_examples("foo.jsonl")
    assert str(e.value) == (
        "dataset 'foo.jsonl' not found: pass a local .jsonl/.json/.parquet/.csv file or directory, "
        "or a Hugging Face dataset name"
    )


def test_unknown_hub_name_fails_fast():
    start = time.monotonic()
    with pytest.raises(DataError, match=r"^dataset 'no-such-org-x9/no-such-dataset' not found: pass a local"):
        load_examples("no-such-org-x9/no-such-dataset")
    assert time.monotonic() - start < 15  # the hub client alone retries for ~25 s offline


def test_bad_extension_and_split(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported data file .*: use a .jsonl"):
        load_examples(str(path))
    with pytest.raises(DataError, match="bad split"):
        load_examples(str(path), "train[:3")


# ------------------------------------------------------------------------------------------------------- format


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


# ---------------------------------------------------------------------------------------------------- tokenizing


def test_instruction_completion_only(tok):
    ex = {"instruction": "Reverse the word.", "input": "kitten", "output": "nettik"}
    t = tokenize_example(ex, tok, "instruction", 256, prompt_format="alpaca")
    assert tok.decode(t["input_ids"]) == (
        "<s>### Instruction:\nReverse the word.\n\n### Input:\nkitten\n\n### Response:\nnettik</s>"
    )
    assert [tok.decode(s) for s in _trained_spans(t["input_ids"], t["labels"])] == ["nettik</s>"]
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
    assert [tok.decode(s) for s in _trained_spans(t["input_ids"], t["labels"])] == ["cba</s>", "abc!</s>"]
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
    assert [tok.decode(s) for s in _trained_spans(t["input_ids"], t["labels"])] == ["cba|", "abc!|"]


def test_messages_fallback_when_history_renders_differently(tok, caplog):
    # earlier assistant turns are shortened in the history: their span in the full chat cannot be located
    tok = embedded_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{% if m['role'] == 'assistant' and not loop.last %}..."
        "{% else %}{{ m['content'] }}{% endif %}|{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    with caplog.at_level(logging.WARNING, logger="qlora_fsdp.data"):
        t = tokenize_example({"messages": CONVERSATION}, tok, "messages", 512)
    assert [tok.decode(s) for s in _trained_spans(t["input_ids"], t["labels"])] == ["abc!|"]  # the last one only
    assert "cannot be located" in caplog.text and "{% generation %}" in caplog.text
    # with {% generation %} markers the template's own mask is used instead
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{% if m['role'] == 'assistant' %}{% generation %}"
        "{% if not loop.last %}...{% else %}{{ m['content'] }}{% endif %}|{% endgeneration %}"
        "{% else %}{{ m['content'] }}|{% endif %}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    t = tokenize_example({"messages": CONVERSATION}, tok, "messages", 512)
    assert [tok.decode(s) for s in _trained_spans(t["input_ids"], t["labels"])] == ["...|", "abc!|"]


def test_prompt_completion_and_text(tok):
    t = tokenize_example({"prompt": "2+3=", "completion": "5"}, tok, "prompt_completion", 64)
    assert tok.decode(t["input_ids"]) == "<s>2+3=5</s>"
    assert [tok.decode(s) for s in _trained_spans(t["input_ids"], t["labels"])] == ["5</s>"]
    conv = {"prompt": CONVERSATION[:4], "completion": [CONVERSATION[4]]}
    t = tokenize_example(conv, tok, "prompt_completion", 512)
    assert [tok.decode(s) for s in _trained_spans(t["input_ids"], t["labels"])] == ["abc!</s>"]
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
    assert [tok.decode(s) for s in _trained_spans(chat["input_ids"], chat["labels"])] == ["nettik</s>"]
    pc = tokenize_example({"prompt": "Reverse the word.", "completion": "drow"}, instruct, "prompt_completion", 256)
    assert tok.decode(pc["input_ids"]).startswith("<s><|user|>\nReverse the word.</s><|assistant|>\n")
    raw = tokenize_example(ex, tok, "instruction", 256, prompt_format="raw")
    assert tok.decode(raw["input_ids"]) == "<s>Reverse the word.\nkittennettik</s>"
    assert [tok.decode(s) for s in _trained_spans(raw["input_ids"], raw["labels"])] == ["nettik</s>"]
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


# ------------------------------------------------------------------------------------------------------ batching


@pytest.fixture(scope="module")
def tiny_llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval().float()
    assert model.config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="module")
def mixed_tokenized(tok, train_raw):
    """Instruction examples (completion-only) plus text examples whose labels equal input_ids, first token included
    (as data tokenized elsewhere may be): packing must still keep each example start from being predicted."""
    rows = [tokenize_example(train_raw[i], tok, "instruction", 128) for i in range(9)]
    for text in ("abcdefgh", "the quick brown fox", "1+2=3"):
        ids = tokenize_example({"text": text}, tok, "text", 128)["input_ids"]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return Dataset.from_list(rows)


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return list(zip(starts[:-1], starts[1:]))


@torch.no_grad()
def test_packing_matches_unpacked_forward(tiny_llama, mixed_tokenized):
    model, data = tiny_llama, mixed_tokenized
    batcher = Batcher(data, packing=True, max_tokens=200, seed=1)
    seen, loss_sum, n_sum = [], 0.0, 0
    for batch in batcher:
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert ids.shape == labels.shape == pos.shape and ids.shape[0] == 1 and ids.shape[1] <= 200
        assert batch["num_label_tokens"] == int((labels != IGNORE_INDEX).sum())
        out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        packed_loss_sum, packed_n = 0.0, 0
        for s, e in _segments(pos):
            i = next(k for k in range(len(data)) if data[k]["input_ids"] == ids[0, s:e].tolist() and k not in seen)
            seen.append(i)
            assert labels[0, s] == IGNORE_INDEX and labels[0, s + 1 : e].tolist() == data[i]["labels"][1:]
            single_ids = torch.tensor([data[i]["input_ids"]])
            single_labels = torch.tensor([data[i]["labels"]])
            ref = model(input_ids=single_ids, labels=single_labels, use_cache=False)
            torch.testing.assert_close(out.logits[:, s:e], ref.logits, atol=1e-5, rtol=0)
            n = int((single_labels[0, 1:] != IGNORE_INDEX).sum())  # tokens the model predicts (shifted)
            packed_loss_sum += ref.loss.item() * n
            packed_n += n
        assert packed_n == batch["num_label_tokens"]
        assert abs(out.loss.item() - packed_loss_sum / packed_n) < 1e-5  # token-weighted mean of per-example losses
        loss_sum, n_sum = loss_sum + out.loss.item() * packed_n, n_sum + packed_n
        # control: the same row without restarting positions lets examples see each other
        if len(_segments(pos)) > 1:
            bad = model(input_ids=ids, use_cache=False).logits
            assert (bad[:, _segments(pos)[1][0] :] - out.logits[:, _segments(pos)[1][0] :]).abs().max() > 1e-3
    assert sorted(seen) == list(range(len(data)))  # every example exactly once per epoch


@torch.no_grad()
def test_padded_batches_match_unpadded_forward(tiny_llama, mixed_tokenized, tok):
    model, data = tiny_llama, mixed_tokenized
    batcher = Batcher(data, packing=False, batch_size=4, pad_token_id=tok.pad_token_id, seed=2)
    assert len(batcher) == 3
    for batch in batcher:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        for r in range(ids.shape[0]):
            n = int(mask[r].sum())
            assert (ids[r, n:] == tok.pad_token_id).all() and (labels[r, n:] == IGNORE_INDEX).all()
            assert labels[r, 0] == IGNORE_INDEX
            ref = model(input_ids=ids[r : r + 1, :n], use_cache=False).logits
            torch.testing.assert_close(out.logits[r : r + 1, :n], ref, atol=1e-5, rtol=0)


def _as_lists(batches):
    return [{k: v.tolist() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


@pytest.mark.parametrize(
    "kwargs",
    [dict(packing=True, max_tokens=256), dict(packing=False, batch_size=7, group_by_length=True, mega_batches=3)],
    ids=["packed", "padded-grouped"],
)
def test_resume_yields_the_remaining_batches(tok, train_raw, kwargs):
    data = tokenize_dataset(train_raw.select(range(120)), tok, max_length=128)
    full = Batcher(data, seed=5, **kwargs)
    per_epoch = len(full)
    total = 2 * per_epoch + 3  # crosses two epoch boundaries
    expected = _as_lists(itertools.islice(full.forever(), total))
    assert full.state_dict()["epoch"] == 2 and full.state_dict()["position"] == 3
    for k in (0, 5, per_epoch - 1, per_epoch, per_epoch + 2):
        first = Batcher(data, seed=5, **kwargs)
        head = _as_lists(itertools.islice(first.forever(), k))
        state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
        resumed = Batcher(data, seed=5, **kwargs)
        resumed.load_state_dict(state)
        assert head + _as_lists(itertools.islice(resumed.forever(), total - k)) == expected
    # plain iteration = one epoch from where it stands
    b = Batcher(data, seed=5, **kwargs)
    assert _as_lists(b) == expected[:per_epoch] and b.state_dict()["epoch"] == 1
    # shuffled per epoch and per seed
    first_ids = lambda bs: [x["input_ids"] for x in bs]  # noqa: E731
    assert first_ids(expected[:per_epoch]) != first_ids(expected[per_epoch : 2 * per_epoch])
    assert first_ids(_as_lists(Batcher(data, seed=6, **kwargs))) != first_ids(expected[:per_epoch])
    # a state from other settings is refused
    other = Batcher(data, seed=6, **kwargs)
    with pytest.raises(DataError, match="saved for other data or settings"):
        other.load_state_dict(state)


def test_group_by_length_reduces_padding(tok, train_raw):
    data = tokenize_dataset(train_raw.select(range(300)), tok, max_length=128)

    def padding(**kw):
        return sum(int((b["attention_mask"] == 0).sum()) for b in Batcher(data, packing=False, batch_size=8, **kw))

    assert padding(group_by_length=True) < 0.5 * padding(group_by_length=False)


def test_batcher_errors(tok, mixed_tokenized):
    with pytest.raises(DataError, match="more than max_tokens=8: raise max_tokens"):
        Batcher(mixed_tokenized, packing=True, max_tokens=8)
    with pytest.raises(DataError, match="run tokenize_dataset first"):
        Batcher(Dataset.from_list(ROWS))


# ------------------------------------------------------------------------------------------------ embedded assets


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
