"""A GGUF file as the model (qlora_fsdp/gguf.py): a tiny Llama written here the way llama.cpp lays it out (q/k rows
interleaved per head, F32 tensors, a byte-level BPE vocabulary) loads to the logits of the model it was written from;
the conversion is cached and redone when the file changes; every failure is one line that names the fix."""

import os
import sys

import numpy as np
import pytest
import torch
import transformers

from qlora_fsdp.model import ModelLoadError, load_model, resolve_model_dir

gguf = pytest.importorskip("gguf")

LLAMA = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rope_theta=10000.0,
             rms_norm_eps=float(np.float32(1e-5)),  # as the GGUF stores it
             bos_token_id=257, eos_token_id=257, tie_word_embeddings=False)  # fmt: skip
NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
         "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip


def interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows as llama.cpp stores them: per head, the rotary pairs (i, i + d/2) of transformers' layout adjacent."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, state: dict[str, torch.Tensor] | None = None, arch: str = "llama") -> None:
    """A GGUF of the tiny Llama `state` (transformers names) with a byte-level BPE vocabulary: 256 bytes, "he", eos."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    for add, value in [(w.add_context_length, 64), (w.add_embedding_length, 64), (w.add_block_count, 2),
                       (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_rope_dimension_count, 16), (w.add_rope_freq_base, 10000.0),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_vocab_size, 258)]:  # fmt: skip
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([bytes_to_unicode()[b] for b in range(256)] + ["he", "<|endoftext|>"])
    w.add_token_types([1] * 257 + [3])  # normal, ..., control
    w.add_token_merges(["h e"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(257)
    for name, t in (state or {}).items():
        t = t.float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            t = interleave_rotary(t, 4 if "q_proj" in name else 2)
        module = name.removesuffix(".weight")
        if module.startswith("model.layers."):  # model.layers.{i}.self_attn.q_proj -> blk.{i}.attn_q
            _, _, i, module = module.split(".", 3)
            w.add_tensor(f"blk.{i}.{NAMES[module]}.weight", t)
        else:
            w.add_tensor(f"{NAMES[module]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def own_lines(stderr: str) -> list[str]:
    """stderr without the progress bars of transformers and datasets (tqdm, redrawn after a carriage return)."""
    return [line for line in stderr.splitlines() if line.strip() and "\r" not in line and "it/s]" not in line]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a transformers checkpoint directory, the GGUF file written from it): bf16 weights, exact in F32."""
    tmp = tmp_path_factory.mktemp("gguf")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(1.0 if p.ndim == 1 else 0.0, 0.02 if p.ndim > 1 else 0.1)
    model.save_pretrained(tmp / "hf")
    write_gguf(tmp / "tiny.gguf", model.state_dict())
    return tmp / "hf", tmp / "tiny.gguf"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_FSDP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def test_a_gguf_file_loads_to_the_logits_of_the_model_it_was_written_from(tiny, cache, capsys):
    from qlora_fsdp.training.batches import load_tokenizer

    hf, file = tiny
    out = resolve_model_dir(file)
    st = file.stat()
    assert out == cache / f"tiny-{st.st_size}-{st.st_mtime_ns}"
    assert own_lines(capsys.readouterr().err) == [f"converting tiny.gguf to a 16-bit checkpoint in {out} (once)"]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    ids = torch.randint(0, 258, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same bf16 weights (q/k rows back in transformers' order), so the same NF4 bytes
        assert torch.equal(load_model(file, device="cpu")(ids).logits, load_model(hf, device="cpu")(ids).logits)
    assert "converting" not in capsys.readouterr().err  # converted once
    assert load_tokenizer(str(file))("hehe h").input_ids == [256, 256, 32, 104]  # "he" merged; token b is byte b


def test_a_directory_holding_one_gguf_resolves_to_it_and_a_changed_file_converts_again(tiny, cache, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    file = folder / "tiny.gguf"
    file.write_bytes(tiny[1].read_bytes())
    first = resolve_model_dir(folder)
    assert first.parent == cache and (first / "model.safetensors").is_file()
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    second = resolve_model_dir(file)
    assert second != first and (second / "model.safetensors").is_file()
    (folder / "other.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"holds 2 GGUF files \(other.gguf, tiny.gguf\): pass one of them"):
        resolve_model_dir(folder)


def test_a_broken_or_foreign_gguf_or_no_gguf_package_is_a_one_line_error(tiny, cache, tmp_path, monkeypatch):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    foreign = tmp_path / "foreign.gguf"
    write_gguf(foreign, arch="notanarch")
    for file, match in [(broken, "cannot convert this GGUF"), (foreign, "notanarch.*not supported")]:
        with pytest.raises(ModelLoadError, match=match) as e:
            load_model(file, device="cpu")
        message = str(e.value)
        assert message.startswith(str(file)) and "\n" not in message and "safetensors checkpoint" in message, message
    assert [p.name for p in cache.iterdir()] == [".lock"]  # no directory, whole or half-written
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(ModelLoadError, match=r"tiny.gguf: reading GGUF files needs the gguf package: pip install gguf"):
        resolve_model_dir(tiny[1])


def test_the_cli_reports_a_missing_or_broken_gguf_in_one_line(tmp_path, cache, capsys):
    from qlora_fsdp.cli import main

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    for model, match in [("/nonexistent/x.gguf", "not found"), (str(broken), "cannot convert this GGUF")]:
        assert main(["train", "--model", model, "--device", "cpu", "--output-dir", str(tmp_path / "run")]) == 2
        err = own_lines(capsys.readouterr().err)
        assert err[-1].startswith("qlora-fsdp train: error: ") and model in err[-1] and match in err[-1], err
        assert all(line.startswith("converting broken.gguf") for line in err[:-1]), err  # no traceback
