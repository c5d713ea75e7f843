"""transformers' Trainer and TRL's SFTTrainer on 2 gloo ranks with our FSDP2 sharding (`shard_for_trainer`) against
the same trainers on one process with 2 accumulation steps: equal per-step losses and equal saved adapters."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from qlora_fsdp.parallel.cpu_threads import share_cpu_cores
from tests.parallel.test_fsdp import free_port, tiny_llama
from tests.training.test_loop import SequentialTrainerMixin, collate, hf_args, synthetic_examples

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
WORLD = 2


def sft_rows():
    words = ["cat", "house", "river", "stone", "apple", "light", "green", "table"]
    return [{"prompt": f"Reverse the word: {w}\n", "completion": w[::-1]} for w in words * 4]


def make_trainer(kind, out, model_dir, world, **kw):
    """A Trainer (kind "trainer") or SFTTrainer ("sft") on the tiny Llama with LoRA r=4; sharded when world > 1."""
    from qlora_fsdp.hf import ShardedTrainerMixin, shard_for_trainer
    from qlora_fsdp.model import embedded_model_dir, load_model

    accum = 2 // world  # the same global batch: 2 x 4 examples per step
    if kind == "sft":
        trl = pytest.importorskip("trl")
        args = hf_args(trl.SFTConfig, out, max_length=64, bf16=False, **kw)
        base_cls, data = trl.SFTTrainer, {"train_dataset": datasets.Dataset.from_list(sft_rows()),
                                          "processing_class": transformers.AutoTokenizer.from_pretrained(embedded_model_dir())}  # fmt: skip
    else:
        args = hf_args(transformers.TrainingArguments, out, remove_unused_columns=False, **kw)
        base_cls, data = transformers.Trainer, {"train_dataset": datasets.Dataset.from_list(synthetic_examples()),
                                                "data_collator": collate}  # fmt: skip
    args.gradient_accumulation_steps = accum
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(load_model(model_dir, dtype=torch.float32, device="cpu"), lora)
    shard_for_trainer(model, args)

    class Seq(SequentialTrainerMixin, ShardedTrainerMixin, base_cls):
        pass

    return Seq(model=model, args=args, **data)


KINDS = ["trainer", "sft"]


def _worker(rank, port, root, kinds):
    """Both trainers in turn on the same 2 ranks (one launch: starting ranks costs more than these runs), each in its
    own folder root / kind, on a freshly loaded model."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))  # fmt: skip
    share_cpu_cores(WORLD)
    try:
        for kind in kinds:
            out = root / kind
            trainer = make_trainer(kind, out / "sharded", root / "model", WORLD, save_strategy="steps", save_steps=2)
            local = trainer.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.to_local()
            assert local.shape[0] * WORLD == trainer.model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight.shape[0]
            trainer.train()
            trainer.save_model(str(out / "sharded" / "adapter"))
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            if kind == "trainer":  # resume from the sharded checkpoint of step 2 (DCP optimizer state): the same steps 3-4
                again = make_trainer(kind, out / "sharded", root / "model", WORLD, save_strategy="no")
                again.train(resume_from_checkpoint=str(out / "sharded" / "checkpoint-2"))
                losses += [h["loss"] for h in again.state.log_history if "loss" in h and h["step"] > 2]
            if rank == 0:
                torch.save(losses, out / "losses.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The folder of the 2-rank runs of both trainers (one launch), and the launch's error if it failed."""
    root = tmp_path_factory.mktemp("sharded")
    tiny_llama(root / "model")
    for kind in KINDS:
        (root / kind).mkdir()
    try:
        mp.spawn(_worker, args=(free_port(), root, KINDS), nprocs=WORLD, join=True)
    except Exception as e:  # noqa: BLE001 - reported by the tests whose run did not finish
        return root, e
    return root, None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", KINDS)
def test_trainer_on_two_ranks_equals_one_process(sharded, tmp_path, kind):
    from safetensors.torch import load_file

    root, error = sharded
    if not (root / kind / "losses.pt").is_file():
        pytest.fail(f"the 2-rank launch did not finish the {kind} run: {error}")
    ref = make_trainer(kind, tmp_path / "one", root / "model", 1)
    ref.train()
    ref.save_model(str(tmp_path / "one" / "adapter"))
    theirs = [h["loss"] for h in ref.state.log_history if "loss" in h]
    assert len(theirs) == 4
    if kind == "trainer":
        theirs += theirs[2:]
    torch.testing.assert_close(torch.tensor(torch.load(root / kind / "losses.pt")), torch.tensor(theirs), rtol=1e-5, atol=0)
    got = load_file(root / kind / "sharded" / "adapter" / "adapter_model.safetensors")
    want = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # lora_A and lora_B of 7 projections x 2 layers
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
