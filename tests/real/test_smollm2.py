"""SmolLM2-135M-Instruct, a real pretrained model (tests/real/conftest.py): load_model against transformers +
bitsandbytes (the NF4 bytes of every linear, the logits), and a bnb-4bit copy that transformers saves."""

import pytest
import torch

from qlora_fsdp.model import load_model
from qlora_fsdp.nf4.tensor import NF4Tensor

pytestmark = pytest.mark.real
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. Water boils at 100 degrees Celsius at "
        "sea level. def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n")  # fmt: skip


def hf_bnb_model(path):
    """transformers + bitsandbytes NF4 (double quant, bf16 compute) on CPU, on its portable path (the AVX-512 one
    rounds the absmax to bf16)."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                              dtype=torch.bfloat16)  # fmt: skip
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def ids(smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    return tok(TEXT, return_tensors="pt").input_ids


# One load of each model for the tests below, which only read them and run them without gradients (each load of the
# 135M model quantizes its 210 linears, 2-3 s).
@pytest.fixture(scope="module")
def ours(smollm2_dir):
    """load_model of the converted checkpoint, bf16."""
    return load_model(smollm2_dir, dtype=torch.bfloat16, device="cpu")


@pytest.fixture(scope="module")
def theirs(smollm2_dir, tmp_path_factory):
    """transformers + bitsandbytes (hf_bnb_model), with what it held as loaded, before anything else touched it (the
    CPU forward repacks the weights): each Linear4bit's packed bytes, absmax and nested absmax, and a bnb-4bit copy
    that transformers saved."""
    model = hf_bnb_model(smollm2_dir)
    linears = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone(), m.weight.quant_state.state2.absmax.clone())
               for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}  # fmt: skip
    saved = tmp_path_factory.mktemp("bnb4")
    model.save_pretrained(saved)
    return model, linears, saved


def test_every_linear_holds_bitsandbytes_nf4_bytes(ours, theirs):
    _, linears, _ = theirs
    assert len(linears) == 30 * 7  # every projection of the 30 layers; the tied embedding / lm_head stays 16-bit
    for name, (data, absmax, nested_absmax) in linears.items():
        w = ours.get_submodule(name).weight
        assert isinstance(w, NF4Tensor), name
        assert torch.equal(w.nf4.data, data.view(-1)), name
        assert torch.equal(w.nf4.absmax, absmax) and torch.equal(w.nf4.nested_absmax, nested_absmax), name


def test_logits_equal_transformers_bitsandbytes(smollm2_dir, ids, ours, theirs):
    theirs = theirs[0]
    dense = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits.float() for m in (ours, theirs, dense))
    kl = lambda p, q: torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True,  # noqa: E731
                                                 reduction="none").sum(-1).mean().item()  # fmt: skip
    assert torch.equal(a, b)  # bit for bit (bnb's portable CPU path, bf16)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.98
    assert kl(b, a) <= 1e-3 and kl(b, a) <= kl(b, c) / 20, (kl(b, a), kl(b, c))  # NF4 vs NF4, against NF4 vs dense
    print(f"SmolLM2 logits vs bnb: top-1 {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}, KL {kl(b, a):.2e} "
          f"(dense vs bnb: {kl(b, c):.3f}), max |diff| {(a - b).abs().max():.3f}")


def test_a_bnb_4bit_copy_imports_bit_exact(ids, ours, theirs):
    saved = theirs[2]  # saved before any forward: the CPU forward repacks the weights
    from_bnb, from_16bit = load_model(saved, dtype=torch.bfloat16, device="cpu"), ours
    for (name, w), w16 in zip(from_bnb.named_parameters(), from_16bit.parameters()):
        if isinstance(w, NF4Tensor):
            assert torch.equal(w.nf4.data, w16.nf4.data) and torch.equal(w.nf4.absmax, w16.nf4.absmax), name
    with torch.no_grad():
        assert torch.equal(from_bnb(input_ids=ids).logits, from_16bit(input_ids=ids).logits)


WORDS = ["apple", "river", "stone", "light", "green", "table", "house", "cloud", "bread", "chair", "plant", "music",
         "water", "night", "smile", "grape", "lemon", "tiger", "zebra", "ocean", "piano", "queen", "robot", "sugar",
         "train", "uncle", "video", "whale", "yacht", "kayak"]  # fmt: skip


def greedy_answers(model, tok, prompts, max_new_tokens=3):
    """Greedy answers to prompts as user turns of the model's chat template (how `--prompt-format auto` trains an
    instruct model), built here with transformers alone."""
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
        out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


@pytest.mark.timeout(600)
def test_the_cli_finetunes_it_and_the_adapter_and_merged_export_answer_alike(smollm2_gguf, smollm2_dir, tmp_path,
                                                                            capsys):
    """A task made here (first / last letter of a word), trained from the `.gguf` file itself (`--model file.gguf`):
    held-out exact match rises; the adapter records the converted checkpoint as its base (a directory peft can read
    a config from) and loads in peft onto the NF4 base, and the merged 16-bit export, loaded from there, answers the
    held-out prompts as it does."""
    import json

    import peft

    from qlora_fsdp.cli import main
    from qlora_fsdp.inference import dense_weights
    from qlora_fsdp.training import TrainConfig
    from qlora_fsdp.training.batches import data_sources

    rows = [{"prompt": f"{kind.title()} letter of {w}:", "completion": " " + (w[0] if kind == "first" else w[-1]),
             "kind": kind} for kind in ("first", "last") for w in WORDS * 2]  # fmt: skip
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--model", str(smollm2_gguf), "--dataset", str(tmp_path / "task.jsonl"), "--eval-fraction", "0.2",
                 "--max-steps", "10", "--warmup-steps", "1", "--batch-size", "8", "--lr", "2e-3", "--max-length", "64",
                 "--precision", "fp32", "--device", "cpu", "--output-dir", str(out)]) == 0  # fmt: skip
    print(capsys.readouterr().out)
    result = json.loads((out / "eval.json").read_text())
    assert result["examples"] == 24 and result["group_by"] == "kind"
    assert result["exact_match_trained"] >= result["exact_match_untrained"] + 0.25, result  # 0% -> 50% when written
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11)), records
    held_out = data_sources(TrainConfig(dataset=str(tmp_path / "task.jsonl"), eval_fraction=0.2))[1]
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    adapted = peft.PeftModel.from_pretrained(load_model(smollm2_dir, dtype=torch.float32, device="cpu"), out / "adapter")
    with dense_weights(adapted) as dense:  # the base dequantized once; the adapter stays peft's own modules
        assert dense
        ours = greedy_answers(adapted, tok, held_out["prompt"])
    assert sum(a == r.strip() for a, r in zip(ours, held_out["completion"])) / len(ours) == result["exact_match_trained"]
    assert main(["export", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged"), "--merge", "--dtype",
                 "fp32", "--device", "cpu"]) == 0  # fmt: skip
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.config.num_hidden_layers == 30 and merged.config.hidden_size == 576
    same = sum(a == b for a, b in zip(ours, greedy_answers(merged, tok, held_out["prompt"])))
    assert same >= 0.9 * len(ours), (same, len(ours))  # the merged base is the dequantized NF4 + B A s, rounded once


def short_loop(out, model_dir, grad_accum, device="cpu"):
    """2 steps of 4 synthetic examples a batch (the first before any update, the second after one), one held-out
    batch (evaluated before and after)."""
    from qlora_fsdp.training import TrainConfig, TrainLoop
    from qlora_fsdp.training.batches import FixedBatches
    from tests.training.test_loop import collate, synthetic_examples

    batches = [collate(synthetic_examples(n=16)[i : i + 4]) for i in range(0, 16, 4)]
    cfg = TrainConfig(output_dir=str(out), max_steps=2, lr=1e-3, warmup_steps=1, progress=False, device=device,
                      precision="fp32", lora_r=4, lora_alpha=8, grad_accum=grad_accum)  # fmt: skip
    return TrainLoop(cfg, model=load_model(model_dir, dtype=torch.float32, device=device),
                     train_batches=FixedBatches(batches), eval_batches=FixedBatches(batches[:1]))  # fmt: skip


def _rank(rank, port, out, model_dir):
    import os

    import torch.distributed as dist

    from qlora_fsdp.parallel.cpu_threads import share_cpu_cores

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    share_cpu_cores(2)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loop = short_loop(out / "fsdp", model_dir, grad_accum=1)
    local = loop.model.base_model.model.model.layers[0].self_attn.o_proj.base_layer.weight.to_local()
    records = loop.train()
    if rank == 0:
        torch.save({"records": records, "shard_bytes": local.nf4.data.numel() + local.nf4.absmax.numel()}, out / "fsdp.pt")
    dist.destroy_process_group()
    os._exit(0)  # a gloo thread may abort interpreter teardown (tests/parallel/test_fsdp.py)


@pytest.mark.timeout(600)
def test_it_trains_on_two_gloo_ranks_with_the_losses_of_one_process(smollm2_dir, tmp_path):
    """FSDP2 over 2 ranks: its 576 x 576 projections shard in windows of quant groups (nf4/sharding.py), each rank
    at most one group (8,448 bytes) over half."""
    import torch.multiprocessing as mp

    from tests.parallel.test_fsdp import free_port

    mp.spawn(_rank, args=(free_port(), tmp_path, smollm2_dir), nprocs=2, join=True)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    ref_loop = short_loop(tmp_path / "one", smollm2_dir, grad_accum=2)
    ref = ref_loop.train()
    losses = lambda rs, k: torch.tensor([r[k] for r in rs if k in r])  # noqa: E731
    for k in ("loss", "eval_loss"):
        torch.testing.assert_close(losses(got["records"], k), losses(ref, k), rtol=1e-5, atol=0)
    w = ref_loop.model.base_model.model.model.layers[0].self_attn.o_proj.base_layer.weight.nf4
    total = w.data.numel() + w.absmax.numel()
    assert total / 2 <= got["shard_bytes"] <= total / 2 + 8192 + 256, (got["shard_bytes"], total)


def test_load_model_takes_the_gguf_file_as_its_converted_checkpoint(smollm2_gguf, smollm2_dir, ids, ours, tmp_path,
                                                                    capsys):
    """The .gguf path itself (and a directory holding only it) resolves to the cached conversion: no second one."""
    from qlora_fsdp.model import resolve_model_dir

    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "model.gguf").symlink_to(smollm2_gguf)
    assert resolve_model_dir(smollm2_gguf) == smollm2_dir == resolve_model_dir(tmp_path / "only")
    from_gguf, from_dir = load_model(smollm2_gguf, dtype=torch.bfloat16, device="cpu"), ours
    assert "converting" not in capsys.readouterr().err
    assert from_gguf.config._name_or_path == str(smollm2_gguf)
    assert isinstance(from_gguf.model.layers[0].mlp.down_proj.weight, NF4Tensor)
    with torch.no_grad():
        assert torch.equal(from_gguf(input_ids=ids).logits, from_dir(input_ids=ids).logits)
