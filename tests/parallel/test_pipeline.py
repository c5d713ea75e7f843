"""Pipeline parallelism (parallel/pipeline.py) on 2 gloo ranks against one process: every schedule gives the
one-process per-step losses and final LoRA weights for the same global batch; zero-bubble really defers the LoRA
weight gradients to the weight pass."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from qlora_fsdp.compile import token_loss_sum
from qlora_fsdp.model import load_model
from qlora_fsdp.train import TrainConfig, add_lora, seed_everything
from tests.parallel.test_fsdp import free_port
from tests.test_train import synthetic_examples

STEPS, BATCH, T, MICRO = 3, 8, 20, 4
PP = 2


def four_layer_llama(path):
    import transformers

    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=104, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def step_batches():
    """STEPS global batches of BATCH examples, all padded to T tokens (a pipeline keeps one sequence length)."""
    ex = synthetic_examples(n=BATCH * STEPS)
    pad = lambda xs, v: [x + [v] * (T - len(x)) for x in xs]  # noqa: E731
    return [{"input_ids": torch.tensor(pad([e["input_ids"] for e in chunk], 0)),
             "labels": torch.tensor(pad([e["labels"] for e in chunk], -100)),
             "attention_mask": torch.tensor(pad([[1] * len(e["input_ids"]) for e in chunk], 0))}
            for chunk in (ex[i : i + BATCH] for i in range(0, len(ex), BATCH))]  # fmt: skip


def peft_model(model_dir):
    cfg = TrainConfig(output_dir="unused", lora_r=4, lora_alpha=8, precision="fp32", device="cpu")
    seed_everything(cfg.seed)  # the LoRA initialisation TrainLoop makes
    return add_lora(load_model(model_dir, dtype=torch.float32, device="cpu"), cfg)


def label_tokens(b):
    return int((b["labels"][:, 1:] != -100).sum())


def one_process(model_dir):
    model = peft_model(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
    losses = []
    for b in step_batches():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        loss = token_loss_sum(logits, b["labels"]) / label_tokens(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _worker(rank, port, out, model_dir, schedule):
    import torch.distributed as dist

    from qlora_fsdp.parallel.pipeline import build_pipeline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=PP)
    try:
        model = peft_model(model_dir)
        names = {id(p): n for n, p in model.named_parameters()}
        n_tok = [1]
        loss_fn = lambda logits, labels: token_loss_sum(logits, labels) / n_tok[0]  # noqa: E731
        sched, mods = build_pipeline(model, schedule, rank, PP, n_microbatches=MICRO, loss_fn=loss_fn)
        params = [p for m in mods for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0)
        deferred = []  # zero-bubble, non-first stages: (input pass left LoRA grads as they were, weight pass changed them)
        if schedule in ("zbv", "interleaved_zb"):
            for st in sched._stages:
                if st.stage_index == 0:
                    continue

                def grads(_st=st):
                    return [None if p.grad is None else p.grad.clone() for p in _st.submod.parameters() if p.requires_grad]

                def same(a, b):
                    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                               for x, y in zip(a, b))  # fmt: skip

                def probe(*a, _f=st.backward_one_chunk, _g=grads, **k):
                    before = _g()
                    r = _f(*a, **k)
                    if not k.get("full_backward", True):
                        deferred.append(("I", same(before, _g())))
                    return r

                def probe_w(*a, _f=st.backward_weight_one_chunk, _g=grads, **k):
                    before = _g()
                    r = _f(*a, **k)
                    deferred.append(("W", not same(before, _g())))
                    return r

                st.backward_one_chunk, st.backward_weight_one_chunk = probe, probe_w
        losses = []
        for b in step_batches():
            n_tok[0] = label_tokens(b)
            mb_losses = []
            sched.step(b["input_ids"], attention_mask=b["attention_mask"], target=b["labels"], losses=mb_losses)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total = torch.tensor(sum(float(x) for x in mb_losses), dtype=torch.float64)
            dist.all_reduce(total)  # only the last stage's rank holds losses
            losses.append(float(total))
        lora = {names[id(p)]: p.detach().clone() for m in mods for p in m.parameters() if p.requires_grad}
        torch.save({"losses": losses, "lora": lora, "deferred": deferred}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    os._exit(0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_zb", "zbv"])
def test_two_stage_ranks_equal_one_process(tmp_path, schedule):
    model_dir = four_layer_llama(tmp_path / "model")
    mp.spawn(_worker, args=(free_port(), tmp_path, model_dir, schedule), nprocs=PP, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(PP)]
    ref_losses, ref_lora = one_process(model_dir)
    torch.testing.assert_close(torch.tensor(got[0]["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    lora = {**got[0]["lora"], **got[1]["lora"]}
    assert lora.keys() == ref_lora.keys()
    for k in ref_lora:  # summation order differs (microbatches): Adam turns ~1e-7 into ~1e-5 on tiny gradients
        torch.testing.assert_close(lora[k], ref_lora[k], rtol=1e-4, atol=3e-5)
    if schedule in ("zbv", "interleaved_zb"):
        deferred = got[0]["deferred"] + got[1]["deferred"]
        # input-gradient passes leave the LoRA gradients untouched, weight passes fill them
        assert {kind for kind, _ in deferred} == {"I", "W"} and all(ok for _, ok in deferred), deferred


def test_bad_pipeline_setups_are_one_line_errors(tmp_path):
    from qlora_fsdp.parallel.pipeline import PipelineError, build_pipeline, split_bounds

    assert split_bounds(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(PipelineError, match="lower --pp"):
        split_bounds(2, 4)
    model = peft_model(four_layer_llama(tmp_path / "model"))
    with pytest.raises(PipelineError, match="choose one of"):
        build_pipeline(model, "dualpipe", 0, 2, n_microbatches=4, loss_fn=None)
    with pytest.raises(PipelineError, match="at least 2"):
        build_pipeline(model, "1f1b", 0, 2, n_microbatches=1, loss_fn=None)
    from qlora_fsdp.compile import compile_model

    compile_model(model, backend="eager")
    with pytest.raises(PipelineError, match="refuses zero-bubble schedules with compiled stages"):
        build_pipeline(model, "zbv", 0, 2, n_microbatches=4, loss_fn=None)
