"""lora/linear.py: the rank-side scaling computes peft's LoRA function (outputs and every gradient, fp64), keeps
peft's parameter names and adapter files, and defers to peft for what it does not override."""

import peft
import pytest
import torch

from qlora_fsdp.lora.linear import RankScaledLoraLinear, register_rank_scaled_lora


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=False)
        self.down = torch.nn.Linear(40, 24, bias=True)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


def pair(dtype=torch.float64, **lora):
    """(peft's model, ours) with the same weights, every LoRA B nonzero."""
    models = []
    for ours in (False, True):
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["up", "down"], **lora)
        if ours:
            assert register_rank_scaled_lora(config)
        model = peft.get_peft_model(MLP().to(dtype), config)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        models.append(model)
    return models


def test_same_function_and_gradients():
    ref, ours = pair()
    assert isinstance(ours.base_model.model.up, RankScaledLoraLinear)
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    outs = []
    for model in (ref, ours):
        y = model(x)
        y.pow(2).sum().backward()
        outs.append((y, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=0)
    assert outs[0][1].keys() == outs[1][1].keys() and len(outs[0][1]) == 4
    for name in outs[0][1]:
        torch.testing.assert_close(outs[1][1][name], outs[0][1][name], rtol=1e-12, atol=1e-15, msg=name)


def test_backward_scales_rank_sized_tensors_only():
    """The reason for the class: peft's backward multiplies the (T, out) gradient by s (a full-size copy beside the
    unscaled one); ours multiplies (T, r) tensors only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Muls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten.mul and any(isinstance(a, (int, float)) for a in args):
                self.sizes.append(out.shape[-1])  # a multiply by the scaling (a Python number)
            return out

    widths = []
    for model in pair(torch.float32):
        y = model(torch.randn(2, 5, 24))
        with Muls() as muls:
            y.sum().backward()
        widths.append(sorted(muls.sizes))
    assert widths[0] == [24, 40] and widths[1] == [4, 4], widths  # peft: (T, out) of down and up; ours: (T, r)


def test_adapter_files_load_into_plain_peft(tmp_path):
    _, ours = pair(torch.float32)
    ours.save_pretrained(tmp_path)
    plain = peft.PeftModel.from_pretrained(MLP(), tmp_path)
    for (n, p), (m, q) in zip(ours.named_parameters(), plain.named_parameters()):
        if "lora_" in n:
            assert torch.equal(p, q), n
    x = torch.randn(2, 24)
    plain.base_model.model.load_state_dict(ours.base_model.model.state_dict())
    torch.testing.assert_close(plain(x), ours(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["merged", "disabled", "dora"])
def test_defers_to_peft(case):
    ref, ours = pair(use_dora=case == "dora")
    x = torch.randn(4, 24, dtype=torch.float64)
    for model in (ref, ours):
        if case == "merged":
            model.merge_adapter()
    ctx = (lambda m: m.disable_adapter()) if case == "disabled" else (lambda m: torch.no_grad())
    with ctx(ref):
        want = ref(x)
    with ctx(ours):
        got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
