"""Build the embedded default task and tokenizer shipped in `src/qlora_fsdp/assets/tiny/` (deterministic).

    python tools/make_tiny_assets.py [--out DIR] [--seed 1234]

Writes, into DIR (default: the package's assets folder):

    train.jsonl          2000 instruction examples   {"instruction", "input", "output"}
    eval.jsonl            200 held-out examples       (no eval word occurs in train)
    tokenizer.json        character-level WordLevel tokenizer (every printable ASCII character, \\n, \\t)
    tokenizer_config.json, chat_template.jinja        PreTrainedTokenizerFast: <s> </s> <pad> <unk>, a chat template

The task mixes three kinds a small model (hidden 128, 4 layers) can learn at character level, so held-out exact
match and loss are meaningful:

    reverse   "Reverse the word."        input "kitten"    -> "nettik"
    sort      "Sort the letters."        input "cab"       -> "abc"
    last      "Give the last letter."    input "kitten"    -> "n"

The embedded base (tools/make_tiny_model.py) is pretrained on reverse and sort only; the default run's adapter learns
the last letter in its 300 steps (11 -> 21 right of the 21 in the first 60 held-out examples). Two-digit addition, the
third kind before, was not learned in that budget (0 right before and after), nor was copying the word forward, by this
adapter or by peft's own on the dense base.
Same seed -> byte-identical files (tests check the shipped copy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import tempfile
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "qlora_fsdp" / "assets" / "tiny"
NUM_TRAIN, NUM_EVAL = 2000, 200
KINDS = ("reverse", "sort", "last")

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Characters of the vocabulary, in id order after the special tokens: newline, tab, printable ASCII (space to ~).
CHARACTERS = ["\n", "\t"] + [chr(c) for c in range(32, 127)]

# Each turn: role marker, newline, content, </s>. Assistant replies (content + </s>) sit inside {% generation %}
# so `apply_chat_template(..., return_assistant_tokens_mask=True)` works too; bos opens the conversation.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def _example(kind: str, word: str) -> dict:
    if kind == "reverse":
        return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
    if kind == "sort":
        return {"instruction": "Sort the letters.", "input": word, "output": "".join(sorted(word))}
    return {"instruction": "Give the last letter.", "input": word, "output": word[-1]}


def make_examples(seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) example lists: kinds balanced; eval words unseen in train."""
    rng = random.Random(seed)
    per_kind_eval = [NUM_EVAL // len(KINDS) + (i < NUM_EVAL % len(KINDS)) for i in range(len(KINDS))]
    per_kind_train = [NUM_TRAIN // len(KINDS) + (i < NUM_TRAIN % len(KINDS)) for i in range(len(KINDS))]
    used_words: set[str] = set()

    def fresh() -> str:
        while True:
            w = _word(rng)
            if w not in used_words:
                used_words.add(w)
                return w

    train, held_out = [], []
    for kind, n_eval, n_train in zip(KINDS, per_kind_eval, per_kind_train):
        held_out += [_example(kind, fresh()) for _ in range(n_eval)]
        train += [_example(kind, fresh()) for _ in range(n_train)]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def make_tokenizer():
    """A character-level PreTrainedTokenizerFast: ids 0-3 <unk> <s> </s> <pad>, 4-6 role markers, then CHARACTERS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    backend.decoder = decoders.Fuse()  # concatenate, no spaces between tokens
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        padding_side="right",
        prompt_format="alpaca",  # the embedded model learned its task in the Alpaca template (data/formats.py)
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.chmod(tmp, 0o644)  # package data: readable by all, like any installed file
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def build(out: Path, seed: int = 1234) -> list[str]:
    """Write the data and tokenizer files into `out` (other files there are left alone); returns their names."""
    out.mkdir(parents=True, exist_ok=True)
    names = ["train.jsonl", "eval.jsonl"]
    train, held_out = make_examples(seed)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        _write_atomic(out / name, "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows))
    with tempfile.TemporaryDirectory() as tmp:  # save_pretrained writes in place: stage, then move each file
        make_tokenizer().save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            _write_atomic(out / f.name, f.read_text(encoding="utf-8"))
            names.append(f.name)
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the package assets)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    names = build(args.out, args.seed)
    total = sum((args.out / n).stat().st_size for n in names)
    print(f"wrote {', '.join(names)} to {args.out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
