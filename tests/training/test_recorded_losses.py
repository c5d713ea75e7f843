"""Refactors change nothing: per-step losses of the loop under every option, on CPU, against recorded values.

Recorded at 5a9896e, before the move into kernels/ lora/ memory/ parallel/ training/ data/, and bit-identical after
it (954047d); recorded again when the lr schedule changed on purpose (the first step's lr is lr / warmup, not 0).

Each run: the embedded tiny Llama (fp32 weights, NF4 base), LoRA r=4 on all linears, 3 optimizer steps (eval loss
at step 0 and at the end). The synthetic-batch runs exercise the model options; the embedded-dataset runs exercise
tokenization, packing and batching from a TrainConfig. Recorded on a 2-core x86 CPU with torch 2.13; the tolerance
(1e-6 relative) only absorbs a different CPU's vector width: a changed option order or a changed batch moves the
losses by 1e-3 or more.

    python -m tests.training.test_recorded_losses     # prints fresh values in this file's format (to record again)
"""

import sys

import pytest
import torch

from qlora_fsdp.model import embedded_model_dir, load_model
from qlora_fsdp.training import TrainConfig, TrainLoop
from tests.training.test_loop import ListBatches, collate, synthetic_examples

STEPS = 3
RUNS = {  # name: TrainConfig options (synthetic batches unless "dataset" is given)
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "accum2-dropout": {"grad_accum": 2, "lora_dropout": 0.1},
    "checkpointing-keep1": {"activation_checkpointing": True, "ac_keep_layers": 1},
    "checkpointing-offload": {"activation_checkpointing": True, "offload_activations": True},
    "chunked-loss": {"chunked_loss": True, "loss_chunk_tokens": 7},
    "mlp-chunks": {"mlp_chunk_tokens": 5},
    "embedding-on-cpu": {"embedding_on_cpu": True},
    "keep-dequantized": {"keep_dequantized": True},
    "compile-eager": {"compile": True, "compile_backend": "eager", "chunked_loss": True},
    "rslora-q-v": {"use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
    "embedded-padded": {"dataset": "embedded", "batch_size": 4, "max_length": 256},
    "embedded-packed": {"dataset": "embedded", "packing": True, "max_tokens": 512, "max_length": 256},
}

RECORDED = {  # re-recorded after 954047d, when the first step's lr became lr / warmup (was 0)
    'accum2-dropout': [12.155119243421053, 11.366061160438939, 12.1551194190979, 12.406511306762695, 13.772813320159912],
    'bf16': [12.178872760973478, 11.278424313193874, 12.459057807922363, 11.782949447631836, 12.38744068145752],
    'checkpointing-keep1': [12.155119243421053, 11.271618893271999, 12.44223690032959, 11.77144718170166, 12.394646644592285],
    'checkpointing-offload': [12.155119243421053, 11.271618893271999, 12.44223690032959, 11.77144718170166, 12.394646644592285],
    'chunked-loss': [12.155120448062295, 11.271619294819079, 12.442237854003906, 11.77144718170166, 12.394647598266602],
    'compile-eager': [12.155119644968133, 11.271618893271999, 12.44223690032959, 11.77144718170166, 12.394645690917969],
    'embedded-packed': [0.4804184134488177, 0.47856920436198747, 0.07011055201292038, 0.10602941364049911, 0.24998807907104492],
    'embedded-padded': [0.48041834047708276, 0.4875075887000867, 1.4382812976837158, 0.007556252181529999, 0.19031192362308502],
    'embedding-on-cpu': [12.155119243421053, 11.271618893271999, 12.44223690032959, 11.77144718170166, 12.394646644592285],
    'fp16': [12.154081645764803, 11.272557308799342, 12.440079689025879, 11.772455215454102, 12.395236015319824],
    'fp32': [12.155119243421053, 11.271618893271999, 12.44223690032959, 11.77144718170166, 12.394646644592285],
    'keep-dequantized': [12.155119243421053, 11.271618893271999, 12.44223690032959, 11.77144718170166, 12.394646644592285],
    'mlp-chunks': [12.155119644968133, 11.271618893271999, 12.442237854003906, 11.771448135375977, 12.394646644592285],
    'rslora-q-v': [12.155119243421053, 11.567096910978618, 12.44223690032959, 11.830924034118652, 12.475069046020508],
}


def losses(tmp, options: dict) -> list[float]:
    options = dict(options)
    synthetic = "dataset" not in options
    options = {"max_steps": STEPS, "warmup_steps": 1, "lr": 5e-3, "lora_r": 4, "lora_alpha": 8, "precision": "fp32",
               **options}  # fmt: skip
    cfg = TrainConfig(output_dir=str(tmp), progress=False, device="cpu", **options)
    kw = {}
    if synthetic:
        batches = [collate(synthetic_examples()[i : i + 4]) for i in range(0, 32, 4)]
        kw = {"train_batches": ListBatches(batches), "eval_batches": ListBatches(batches[:2])}
    loop = TrainLoop(cfg, model=load_model(embedded_model_dir(), dtype=torch.float32, device="cpu"), **kw)
    records = loop.train()
    return [r["eval_loss"] for r in records if "eval_loss" in r] + [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_losses_equal_the_recorded_ones(tmp_path, name):
    got = losses(tmp_path, RUNS[name])
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(RECORDED[name], dtype=torch.float64),
                               rtol=1e-6, atol=0)  # fmt: skip


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name in sorted(RUNS):
            print(f"    {name!r}: {losses(f'{d}/{name}', RUNS[name])!r},", file=sys.stdout, flush=True)
