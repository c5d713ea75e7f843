"""Refactors change nothing: per-step losses of the loop under every option, on CPU, against values recorded at
5a9896e (before the move into nf4/ kernels/ memory/ parallel/ training/ data/).

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

RECORDED = {  # at 5a9896e
    'accum2-dropout': [12.155119243421053, 11.828948171515213, 12.1551194190979, 12.485687255859375, 13.895489692687988],
    'bf16': [12.178872760973478, 11.703562284770765, 12.459057807922363, 11.898688316345215, 12.476175308227539],
    'checkpointing-keep1': [12.155119243421053, 11.679535313656455, 12.44223690032959, 11.868001937866211, 12.484947204589844],
    'checkpointing-offload': [12.155119243421053, 11.679535313656455, 12.44223690032959, 11.868001937866211, 12.484947204589844],
    'chunked-loss': [12.155120448062295, 11.679535313656455, 12.442237854003906, 11.868003845214844, 12.484947204589844],
    'compile-eager': [12.155119644968133, 11.679535313656455, 12.44223690032959, 11.868002891540527, 12.48494815826416],
    'embedded-packed': [0.4804184134488177, 0.46623160813665276, 0.07011055201292038, 0.10750564932823181, 0.24109818041324615],
    'embedded-padded': [0.48041834047708276, 0.4792013278483439, 1.4382812976837158, 0.007110735401511192, 0.19474530220031738],
    'embedding-on-cpu': [12.155119243421053, 11.679535313656455, 12.44223690032959, 11.868001937866211, 12.484947204589844],
    'fp16': [12.154081645764803, 11.679468255293997, 12.440079689025879, 11.868083953857422, 12.487222671508789],
    'fp32': [12.155119243421053, 11.679535313656455, 12.44223690032959, 11.868001937866211, 12.484947204589844],
    'keep-dequantized': [12.155119243421053, 11.679535313656455, 12.44223690032959, 11.868001937866211, 12.484947204589844],
    'mlp-chunks': [12.155119644968133, 11.679534912109375, 12.442237854003906, 11.868001937866211, 12.484945297241211],
    'rslora-q-v': [12.155119243421053, 11.7457275390625, 12.44223690032959, 11.868001937866211, 12.518985748291016],
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
