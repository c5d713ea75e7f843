"""The training loop: losses fall, resume continues the same curve, and transformers' Trainer / TRL's
SFTTrainer give the same per-step losses as our loop on the same batches (the independent reference)."""

import json

import pytest
import torch
from torch.utils.data import SequentialSampler

from qlora_fsdp.training.batches import FixedBatches
from qlora_fsdp.training.checkpoint import latest_checkpoint
from qlora_fsdp.model import embedded_model_dir, load_model
from qlora_fsdp.training import TrainConfig, TrainError, TrainLoop

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


ListBatches = FixedBatches  # fixed batches in a fixed order, resumable


def collate(examples, pad_id=0):
    T = max(len(e["input_ids"]) for e in examples)
    pad = lambda xs, v: [x + [v] * (T - len(x)) for x in xs]  # noqa: E731
    return {
        "input_ids": torch.tensor(pad([e["input_ids"] for e in examples], pad_id)),
        "labels": torch.tensor(pad([e["labels"] for e in examples], -100)),
        "attention_mask": torch.tensor(pad([[1] * len(e["input_ids"]) for e in examples], 0)),
    }


def synthetic_examples(n=32, vocab=100, seed=1):
    """Sequences with structure (every second token repeats the previous), the first 3 tokens unlabelled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        half = torch.randint(4, vocab, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g)
        ids = torch.stack([half, half], 1).reshape(-1).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def base_model():
    return load_model(embedded_model_dir(), dtype=torch.float32, device="cpu")


def run_loop(tmp, batches, steps, stop_at=None, resume=False, **kw):
    kw = {"lr": 5e-3, "lora_r": 4, "lora_alpha": 8, "precision": "fp32", **kw}
    cfg = TrainConfig(output_dir=str(tmp), max_steps=steps, warmup_steps=2, progress=False,
                      device="cpu", resume=resume, **kw)  # fmt: skip
    loop = TrainLoop(cfg, model=base_model(), train_batches=ListBatches(batches))
    return [r["loss"] for r in loop.train(stop_at) if "loss" in r], loop


def test_loss_falls_and_outputs_are_written(tmp_path):
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 32, 4)]
    losses, loop = run_loop(tmp_path, batches, 24)
    assert sum(losses[-4:]) / 4 < 0.92 * sum(losses[:4]) / 4  # 4.71 -> 4.20 when written
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 25))
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)


def test_resume_continues_the_same_curve(tmp_path):
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 32, 4)]
    kw = dict(grad_accum=2, save_every=3, lora_dropout=0.1)  # dropout: the RNG state must come back too
    full, _ = run_loop(tmp_path / "full", batches, 10, **kw)
    run_loop(tmp_path / "cut", batches, 10, stop_at=7, **kw)  # "killed" after step 7: last checkpoint at 6
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-6"
    resumed, _ = run_loop(tmp_path / "cut", batches, 10, resume=True, **kw)
    assert resumed == full


def test_half_written_checkpoint_is_ignored(tmp_path):
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 32, 4)]
    run_loop(tmp_path, batches, 4, save_every=2, stop_at=3)
    (tmp_path / "checkpoint-3.abc.tmp").mkdir()  # what a kill during a save leaves
    (tmp_path / "checkpoint-3.abc.tmp" / "adapter_config.json").write_text("{")
    assert latest_checkpoint(tmp_path).name == "checkpoint-2"


def test_bad_config_errors(tmp_path):
    with pytest.raises(TrainError, match="choose one of auto, bf16, fp16, fp32"):
        TrainConfig(precision="fp8").validate()
    batches = [collate(synthetic_examples()[:4])]
    with pytest.raises(TrainError, match="match no layer"):
        run_loop(tmp_path, batches, 1, target_modules=["nonexistent_proj"])


class SequentialTrainerMixin:
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def hf_args(cls, tmp, **kw):
    kw = {"save_strategy": "no", **kw}
    return cls(output_dir=str(tmp), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
               learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=2, logging_steps=1, report_to=[],
               use_cpu=True, optim="adamw_torch", seed=0, dataloader_drop_last=True, **kw)  # fmt: skip


def peft_model():
    torch.manual_seed(0)  # the loop seeds the same way before it adds LoRA
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(base_model(), config)


def our_optimizer(model, warmup=2, total=4):
    """AdamW and the loop's lr schedule (the first step at lr / warmup; transformers' starts at 0), for a Trainer
    that is to take the same steps as the loop."""
    from qlora_fsdp.training.lr_schedule import warmup_cosine

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.0)
    return opt, warmup_cosine(opt, warmup, total)


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_matches_our_loop(tmp_path):
    import datasets

    class SeqTrainer(SequentialTrainerMixin, transformers.Trainer):
        pass

    examples = synthetic_examples()
    model = peft_model()
    trainer = SeqTrainer(model=model, args=hf_args(transformers.TrainingArguments, tmp_path / "hf",
                         remove_unused_columns=False), train_dataset=datasets.Dataset.from_list(examples),
                         data_collator=collate, optimizers=our_optimizer(model))  # fmt: skip
    trainer.train()
    ours, _ = run_loop(tmp_path / "ours", [collate(examples[i : i + 4]) for i in range(0, 32, 4)], 4, grad_accum=2)
    theirs = losses_of(trainer)
    assert len(theirs) == 4
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=1e-5, atol=0)


def test_sft_trainer_matches_our_loop(tmp_path):
    trl = pytest.importorskip("trl")
    import datasets

    class SeqSFT(SequentialTrainerMixin, trl.SFTTrainer):
        pass

    tok = transformers.AutoTokenizer.from_pretrained(embedded_model_dir())
    rows = [{"prompt": f"Reverse the word: {w}\n", "completion": w[::-1]}
            for w in ["cat", "house", "river", "stone", "apple", "light", "green", "table"] * 4]  # fmt: skip
    args = hf_args(trl.SFTConfig, tmp_path / "sft", max_length=64, bf16=False)  # TRL's default is bf16 autocast
    model = peft_model()
    trainer = SeqSFT(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                     optimizers=our_optimizer(model))  # fmt: skip
    batches = [{k: v.clone() for k, v in b.items()} for b in trainer.get_train_dataloader()]
    assert any((b["labels"] == -100).any() for b in batches)  # prompt tokens masked: completion-only loss
    trainer.train()
    ours, _ = run_loop(tmp_path / "ours", batches, 4, grad_accum=2)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(losses_of(trainer)), rtol=1e-5, atol=0)


def test_activation_checkpointing_gives_the_same_losses(tmp_path):
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 32, 4)]
    plain, _ = run_loop(tmp_path / "a", batches, 4)
    checkpointed, _ = run_loop(tmp_path / "b", batches, 4, activation_checkpointing=True)
    assert checkpointed == plain


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_tracks_fp32(tmp_path, precision):
    """Autocast (fp16 with the gradient scaler): the same curve as fp32 up to half-precision rounding."""
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 32, 4)]
    ref, _ = run_loop(tmp_path / "fp32", batches, 6)
    cfg = TrainConfig(output_dir=str(tmp_path / precision), max_steps=6, precision=precision, warmup_steps=2,
                      progress=False, device="cpu", lr=5e-3, lora_r=4, lora_alpha=8)  # fmt: skip
    loop = TrainLoop(cfg, model=load_model(embedded_model_dir(), dtype=torch.float32, device="cpu"),
                     train_batches=ListBatches(batches))  # fmt: skip
    losses = [r["loss"] for r in loop.train() if "loss" in r]
    assert loop.scaler.is_enabled() == (precision == "fp16")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=3e-2, atol=0)


def test_chunked_loss_gives_the_same_curve(tmp_path):
    """--chunked-loss (lm_head + cross-entropy a chunk of tokens at a time) against the full logits, 6 steps."""
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 32, 4)]
    plain, a = run_loop(tmp_path / "a", batches, 6)
    chunked, b = run_loop(tmp_path / "b", batches, 6, chunked_loss=True)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(plain), rtol=1e-5, atol=0)
    lora_a, lora_b = a.lora_state_dict(), b.lora_state_dict()
    for k in lora_a:  # summation order differs: Adam turns ~1e-7 into ~1e-5 on a few elements with tiny gradients
        # (layer 1's k_proj lora_A, whose gradients are the smallest, moves by about 1e-4 of its norm in 6 steps)
        assert (lora_b[k] - lora_a[k]).norm() <= 5e-4 * lora_a[k].norm() + 1e-6, k
    with pytest.raises(TrainError, match="--chunked-loss does not run with --pp"):
        TrainConfig(chunked_loss=True, nproc=2, pp=2, grad_accum=2).validate()


def test_every_module_is_in_training_mode_in_a_step(tmp_path):
    """The loop calls model.train() only when it has not already (it walks every module), so it must not trust the
    root's flag: peft's fresh wrapper is in training mode over a model loaded in eval mode."""
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 8, 4)]
    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=2, warmup_steps=0, progress=False, device="cpu",
                      lora_r=4, precision="fp32", activation_checkpointing=True)  # fmt: skip
    loop = TrainLoop(cfg, model=base_model(), train_batches=ListBatches(batches), eval_batches=ListBatches(batches))
    modes = lambda: {m.training for m in loop.model.modules()}  # noqa: E731
    assert modes() == {True, False}  # as loaded: the wrapper trains, the transformers model evaluates
    loop.train_step()
    assert modes() == {True}
    loop.evaluate()
    assert modes() == {False}
    loop.train_step()
    assert modes() == {True}


def test_outputs_get_the_users_umask(tmp_path):
    """adapter/, checkpoints, metrics.jsonl and loss.png as mkdir and open make them (tempfile's are 0700 / 0600)."""
    import os

    old = os.umask(0o027)
    try:
        batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 8, 4)]
        run_loop(tmp_path, batches, 2)
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("adapter") == mode("checkpoint-2") == 0o750
    assert mode("metrics.jsonl") == mode("loss.png") == mode("adapter/adapter_config.json") == 0o640


def test_the_first_step_trains(tmp_path):
    batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 8, 4)]
    _, loop = run_loop(tmp_path, batches, 2)
    assert [r["lr"] for r in loop.records if "lr" in r] == [5e-3 / 2, 5e-3]  # warmup_steps=2
