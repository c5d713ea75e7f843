"""Regional torch.compile (compile.py): zero graph breaks in a QLoRA decoder layer, recompilation bounded across
sequence lengths, and the same per-step losses as eager (aot_eager: to the bit over 20 steps of the embedded default;
inductor: to fp32 rounding per step)."""

import pytest
import torch

from qlora_fsdp.compile import compile_counts
from qlora_fsdp.training import TrainConfig, TrainLoop
from tests.training.test_loop import ListBatches, base_model, collate, synthetic_examples


@pytest.fixture(autouse=True)
def fresh_dynamo(tmp_path, monkeypatch):
    """Each test counts its own graphs; inductor builds into a fresh cache (a stale one hides source edits)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def loop_on(batches, out, steps, **kw):
    kw = {"lr": 5e-3, "lora_r": 4, "lora_alpha": 8, "precision": "fp32", **kw}
    cfg = TrainConfig(output_dir=str(out), max_steps=steps, warmup_steps=2, progress=False, device="cpu", **kw)
    return TrainLoop(cfg, model=base_model(), train_batches=ListBatches(batches))


def losses(loop):
    return torch.tensor([r["loss"] for r in loop.train() if "loss" in r])


@pytest.mark.timeout(600)
def test_inductor_layer_has_no_graph_breaks_and_matches_eager(tmp_path):
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 12, 4)]  # padded: one code path
    eager = losses(loop_on(batches, tmp_path / "eager", 3))
    loop = loop_on(batches, tmp_path / "compiled", 3, compile=True, compile_backend="inductor")
    compiled = losses(loop)
    counts = compile_counts()
    assert counts["graph_breaks"] == 0 and 1 <= counts["graphs"] <= 3, counts  # layer, loss (+ no-grad eval)
    assert all(p.grad is None for p in loop.params)  # stepped and zeroed: and every LoRA weight moved
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)


@pytest.mark.timeout(300)
def test_sequence_lengths_do_not_recompile(tmp_path):

    ex = synthetic_examples(n=64)
    by_len = {}
    for e in ex:
        by_len.setdefault(len(e["input_ids"]), []).append(e)
    shortest, *lengths = sorted(by_len)  # lengths 8, 10, ..., 18
    # 5 batches of different lengths, each with a shorter example beside the longest (padded: attention mask on)
    batches = [collate(by_len[n][:1] + by_len[shortest][i : i + 1]) for i, n in enumerate(lengths[-5:])]
    assert len({b["input_ids"].shape[1] for b in batches}) == 5
    loop = loop_on(batches, tmp_path, 5, compile=True, compile_backend="aot_eager")
    loop.train_step()  # the first length compiles the layer graph and the loss graph
    first = compile_counts()["graphs"]
    for _ in range(4):
        loop.train_step()
    assert compile_counts()["graphs"] == first <= 2, compile_counts()
    assert compile_counts()["graph_breaks"] == 0 and compile_counts()["recompiles"] == 0, compile_counts()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision, rtol, extra", [("fp32", 0, {"lora_dropout": 0.1, "activation_checkpointing": True})])
def test_embedded_default_compiled_equals_eager(tmp_path, precision, rtol, extra):
    """6 steps of the embedded default (its data, lr 3e-3, batch 8), eager vs compiled (aot_eager): in fp32 bit for
    bit, so a short curve decides as well as a long one. With dropout and checkpointing: the compiled layers' AOT
    backward inside the recomputation. (The plain compiled loop: the layer in
    test_inductor_layer_has_no_graph_breaks_and_matches_eager, the loop in test_recorded_losses.py's compile-eager
    curve and test_sequence_lengths_do_not_recompile; a case without the options here cost 27-31 s of CI. bf16 and
    fp16 against eager: the GPU gate's 1gpu/compile paths, with inductor, every session.)"""
    def run(out, **kw):
        cfg = TrainConfig(output_dir=str(out), max_steps=6, lr=3e-3, batch_size=8, warmup_steps=3, lora_r=16,
                          lora_alpha=32, precision=precision, group_by_length=False, progress=False, device="cpu",
                          eval_every=3, **extra, **kw)  # fmt: skip
        records = TrainLoop(cfg).train()
        return torch.tensor([r["loss"] for r in records if "loss" in r]), torch.tensor([r["eval_loss"] for r in records if "eval_loss" in r])  # fmt: skip

    eager, eager_eval = run(tmp_path / "eager")
    compiled, compiled_eval = run(tmp_path / "compiled", compile=True, compile_backend="aot_eager")
    assert len(eager) == 6 and compile_counts()["graph_breaks"] == 0
    torch.testing.assert_close(compiled, eager, rtol=rtol, atol=0)  # fp32: bit for bit
    torch.testing.assert_close(compiled_eval, eager_eval, rtol=rtol, atol=0)


def test_cli_compile_prints_the_counts(tmp_path, capfd):
    from qlora_fsdp.cli import main
    from qlora_fsdp.model import embedded_model_dir

    data = str(embedded_model_dir() / "train.jsonl")  # not "embedded": no exact-match generation after training
    assert main(["train", "--compile", "--compile-backend", "aot_eager", "--max-steps", "2", "--dataset", data,
                 "--split", "train[:64]", "--output-dir", str(tmp_path)]) == 0  # fmt: skip
    out = capfd.readouterr().out
    assert "graphs compiled, 0 graph breaks" in out


def test_compile_mode_reaches_every_layer_and_bad_modes_are_errors(tmp_path, monkeypatch):
    from qlora_fsdp.training import TrainError

    seen = []
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw) or original(self, **kw))
    batches = [collate(synthetic_examples()[:4])]
    loop_on(batches, tmp_path, 1, compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert seen and all(kw["mode"] == "max-autotune-no-cudagraphs" and kw["fullgraph"] for kw in seen), seen
    with pytest.raises(TrainError, match="--compile-mode fastest: choose one of '', default"):
        TrainConfig(compile=True, compile_mode="fastest").validate()
    with pytest.raises(TrainError, match="is inductor.s: drop --compile-backend aot_eager"):
        TrainConfig(compile=True, compile_mode="max-autotune", compile_backend="aot_eager").validate()
