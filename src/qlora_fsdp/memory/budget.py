"""--max-memory GB: the fastest setup of the memory options whose predicted peak fits a budget (one GPU); the same
memory model predicts a rank's peak under FSDP2 (benchmarks/memory_report.py, the 70B plan).

    setup, terms = plan(model.config, batch=1, seq=2048, budget=16e9, compiled=True)
    terms["total"]   # predicted peak, bytes (what torch.cuda.max_memory_allocated reads after the first step)

The prediction adds up terms of the model's shapes (bytes; T = batch x seq tokens, H hidden, I intermediate,
L layers, V vocabulary, W a layer's NF4 base weights):

    at rest        NF4 base, 16-bit embedding / norms / lm_head, LoRA with its fp32 gradient and 2 AdamW states
                   (parallel/sizing.bytes_at_rest, 1/N a rank under FSDP2, the frozen part on the host with
                   --cpu-offload); less the embedding with --embedding-on-cpu
    gathered       FSDP2 (N > 1): 2 decoder layers' NF4 and LoRA bytes, and the whole lm_head
    kept layers    k x KEPT[mode] x T (H + I) x 2     (k = L without checkpointing, else --ac-keep-layers)
                   + k x 2W with --keep-dequantized   (the forward's bf16 weights held for backward)
    checkpointed   (L - k) x T H x 2                  (each checkpointed layer's input; on the host with
                                                       --offload-activations, where OFFLOAD_IN_FLIGHT x T H x 2
                                                       stay on the GPU, copies not yet done)
    transient      the largest of: a layer's backward, TRANSIENT[mode] x T (H + I) x 2 (TRANSIENT_LAST_KEPT when
                   checkpointing keeps the last layers: their backward recomputes nothing, and the first
                   recomputation comes once they are freed; with --keep-dequantized and a checkpointed layer, at
                   least TRANSIENT_KEEP[mode] x T (H + I) x 2 + 2W: its recomputation's dense weights, kept for its
                   backward) (+ with the eager chunked loss, CHUNK_BYTES x a chunk of 2^26 logits), and the
                   unchunked loss, LOGIT_BYTES[mode, batch > 1] x T V

The factors are fitted to the peaks measured with benchmarks/train_step.py on H100 / H200 (Llama-3.1-8B shape,
bf16, r=16 on all 7 projections; docs/design/memory_budget.md lists the rows and the fit). The plan keeps its
prediction PLAN_MARGIN below the budget (the model's largest under-prediction measured), so that the budget is a cap.
The loop checks the prediction against the measured peak after the first step and warns at more than 10% off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# fitted factors, "compiled" (--compile) and "eager" (docs/design/memory_budget.md)
KEPT = {"compiled": 3.92, "eager": 4.73}  # a kept layer: 0.296 GB / 0.357 GB at 1 x 2048 of the 8B shape
TRANSIENT = {"compiled": 6.07, "eager": 10.3}  # a layer's backward (the recomputation included)
# with checkpointing and the last k >= 1 layers kept, backward begins on a kept layer: nothing is recomputed while the
# most is held (fitted to the H100 runs at 1x2048 k=9, 4x2048 and 1x8192 k=1 and 12: all within 1.5%; eager: no
# such run measured, so the full value, on the safe side)
TRANSIENT_LAST_KEPT = {"compiled": 3.0, "eager": 10.3}
# checkpointing with --keep-dequantized: the recomputed layer's dense weights (2W) and its backward's own transient
# overlap only in part (H100, 6358d09: +0.28 GB over checkpointing alone at 1 x 2048, +0.0 / +0.09 GB at 4 x 2048 /
# 1 x 8192, where the backward's transient is the larger); eager: unmeasured, the full sum
TRANSIENT_KEEP = {"compiled": 4.0, "eager": 10.3}
# --offload-activations: layer inputs on the GPU while their copies to the host are under way (H100, 6358d09 and
# 5b7453e: 5.2-8.3 inputs' bytes above the model without this term at 1 x 2048, 4 x 2048 and 1 x 8192; at 1 x 32768 a
# single one, so there it over-predicts by 8%)
OFFLOAD_IN_FLIGHT = {"compiled": 5.0, "eager": 5.0}
PLAN_MARGIN = 0.03  # the plan's prediction at most this share below the budget (largest under-prediction: 2.5%)
CHUNK_BYTES = {"compiled": 0.0, "eager": 20.0}  # the eager chunked loss, a byte count per logit of one chunk
LOGIT_BYTES = {("compiled", False): 6.0, ("compiled", True): 10.0, ("eager", False): 12.0, ("eager", True): 12.0}
CHUNK_LOGITS = 2**26  # the chunked loss's default chunk (memory/chunked_loss.py)
AUTO_MARGIN = 0.05  # --max-memory auto: the GPU's free memory less this share


class BudgetError(ValueError):
    """No setup fits, or the budget cannot be read; the message names the fix."""


@dataclass(frozen=True)
class Setup:
    """The memory options the planner chooses (TrainConfig fields of the same names)."""

    activation_checkpointing: bool = False
    ac_keep_layers: int = 0
    keep_dequantized: bool = False
    offload_activations: bool = False
    embedding_on_cpu: bool = False
    chunked_loss: bool = False

    def options(self) -> dict:
        return asdict(self)

    def describe(self, layers: int) -> str:
        if not self.activation_checkpointing:
            words = ["no checkpointing"]
        elif self.ac_keep_layers:
            words = [f"checkpointing of the first {layers - self.ac_keep_layers} of {layers} layers"]
        else:
            words = ["checkpointing of every layer"]
        words += [w for flag, w in (("keep_dequantized", "dequantized weights kept"),
                                    ("offload_activations", "layer inputs on the host"),
                                    ("embedding_on_cpu", "embedding on the CPU"),
                                    ("chunked_loss", "chunked loss")) if getattr(self, flag)]  # fmt: skip
        return ", ".join(words)


# the step-time model that orders the candidates (one H100, the 8B shape, compiled; train_step.py): a layer's
# recomputation costs RECOMPUTE_PER_DEQUANT x (tokens / 2048) dequantization passes over its base weights
# (checkpointing's cost, 58 ms a step over 32 layers at 1 x 2048, f477b57); --keep-dequantized spares one pass a layer
# (32 ms a step without checkpointing, d835099), with checkpointing the backward's pass after each recomputation
RECOMPUTE_PER_DEQUANT = 1.84


def step_cost(setup: "Setup", layers: int, tokens: int) -> float:
    """A setup's step time beyond the fastest (no checkpointing, --keep-dequantized), in dequantization passes over
    one layer's base weights: what orders candidates() (the offloads come last, whatever their cost)."""
    recomputed = layers - setup.ac_keep_layers if setup.activation_checkpointing else 0
    return recomputed * RECOMPUTE_PER_DEQUANT * tokens / 2048 + (0 if setup.keep_dequantized else layers)


def candidates(layers: int, *, compiled: bool, tokens: int = 2048) -> list[Setup]:
    """Every setup, fastest first: without the offloads, no checkpointing, checkpointing all but the last k layers
    (k = L-1 .. 0), each with and without --keep-dequantized, ordered by step_cost at `tokens` a microbatch; then
    checkpointing every layer with the layer inputs on the host, then also the embedding on the CPU, each with
    --keep-dequantized first. Each with and without the chunked loss, the faster first (chunked when compiled)."""
    plain = [Setup(), *(Setup(activation_checkpointing=True, ac_keep_layers=k) for k in range(layers - 1, -1, -1))]
    both = [Setup(**{**s.options(), "keep_dequantized": keep}) for s in plain for keep in (True, False)]
    base = sorted(both, key=lambda s: step_cost(s, layers, tokens))  # stable: ties keep the order above
    for offload in ({"offload_activations": True}, {"offload_activations": True, "embedding_on_cpu": True}):
        base += [Setup(activation_checkpointing=True, keep_dequantized=keep, **offload) for keep in (True, False)]
    order = (True, False) if compiled else (False, True)
    return [Setup(**{**s.options(), "chunked_loss": chunked}) for s in base for chunked in order]


def _linear_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of a decoder layer's 7 linears."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]


def _shapes(config) -> tuple[int, int, int, int, int]:
    """(H, I, L, V, W) of a transformers config: W is one decoder layer's linear weights (elements)."""
    w = sum(i * o for i, o in _linear_shapes(config))
    return config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size, w


def predict_peak(config, batch: int, seq: int, setup: Setup, *, compiled: bool, lora_r: int = 16, world: int = 1,
                 cpu_offload: bool = False, offload: str = "frozen", at_rest: dict | None = None) -> dict[str, float]:
    """{term: bytes} of one GPU's predicted peak for `setup` (module docstring) and their "total". Under FSDP2 on
    `world` ranks a rank holds 1/N at rest and, while a layer computes, 2 gathered decoder layers (the one computing
    and the one prefetched: NF4 bytes + 16-bit LoRA) and the whole lm_head (gathered from its forward to its
    backward). `cpu_offload`: what stays on the GPU of the shards at rest, `offload` "frozen" (LoRA, its gradients
    and AdamW states: --cpu-offload) or "all" (nothing: FSDP2's offload of every unit, before 613ff45). `at_rest`:
    parallel/sizing.bytes_at_rest's dict, computed here when not given."""
    from ..parallel.sizing import bytes_at_rest, nf4_nbytes

    mode = "compiled" if compiled else "eager"
    h, inter, layers, vocab, w = _shapes(config)
    tokens = batch * seq
    rest = at_rest or bytes_at_rest(config, world, lora_r)
    if cpu_offload and offload not in ("frozen", "all"):
        raise ValueError(f"offload {offload!r}: 'frozen' or 'all'")
    resident = rest["total"]  # what stays on the GPU of a rank's bytes at rest
    if cpu_offload:
        resident = rest["total"] - rest["base"] if offload == "frozen" else 0.0
    gathered = 0.0
    if world > 1:
        layer_bytes = sum(nf4_nbytes(i * o)[0] + 2 * lora_r * (i + o) for i, o in _linear_shapes(config))
        gathered = 2 * layer_bytes + 2 * vocab * h
    kept = layers if not setup.activation_checkpointing else setup.ac_keep_layers
    layer = tokens * (h + inter) * 2
    kept_bytes = kept * (KEPT[mode] * layer + (2 * w if setup.keep_dequantized else 0))
    transient = TRANSIENT[mode] * layer
    if setup.activation_checkpointing:  # a recomputed layer's dense weights, held through its backward
        if setup.keep_dequantized:
            transient = max(transient, TRANSIENT_KEEP[mode] * layer + 2 * w)
        if kept:  # backward begins on the kept layers (nothing recomputed) and recomputes once they are freed
            transient = max(TRANSIENT_LAST_KEPT[mode] * layer, transient - kept_bytes)
    if setup.chunked_loss:
        transient += CHUNK_BYTES[mode] * min(CHUNK_LOGITS, tokens * vocab)
    else:
        transient = max(transient, LOGIT_BYTES[mode, batch > 1] * tokens * vocab)
    terms = {
        "at_rest": resident - (2 * vocab * h if setup.embedding_on_cpu else 0),
        "gathered": gathered,
        "kept_layers": kept_bytes,
        "checkpointed_inputs": (OFFLOAD_IN_FLIGHT[mode] if setup.offload_activations else layers - kept) * tokens * h * 2,
        "transient": transient,
    }
    terms["total"] = sum(terms.values())
    return terms


def plan(config, batch: int, seq: int, budget: float, *, compiled: bool, lora_r: int = 16,
         fixed: dict | None = None) -> tuple[Setup, dict[str, float]]:  # fmt: skip
    """The fastest candidate whose predicted peak is at most `budget` bytes less PLAN_MARGIN, and its terms.
    `fixed`: options the user set, which every candidate keeps. BudgetError when none fits."""
    from ..parallel.sizing import bytes_at_rest

    fixed = fixed or {}
    rest = bytes_at_rest(config, 1, lora_r)
    layers = config.num_hidden_layers
    allowed = [s for s in candidates(layers, compiled=compiled, tokens=batch * seq)
               if all(getattr(s, k) == v for k, v in fixed.items())]  # fmt: skip
    if not allowed:
        raise BudgetError(f"--max-memory with {fixed}: no setup has these options: drop them and let the budget choose")
    predicted = [(s, predict_peak(config, batch, seq, s, compiled=compiled, lora_r=lora_r, at_rest=rest))
                 for s in allowed]  # fmt: skip
    for setup, terms in predicted:
        if terms["total"] <= budget * (1 - PLAN_MARGIN):
            return setup, terms
    leanest = min(predicted, key=lambda st: st[1]["total"])
    raise BudgetError(f"--max-memory {budget / 1e9:.3g} GB: the leanest setup ({leanest[0].describe(layers)}) is "
                      f"predicted at {leanest[1]['total'] / 1e9:.3g} GB at {batch} x {seq} tokens, and a plan keeps "
                      f"{PLAN_MARGIN:.0%} below the budget: raise the budget, or lower --batch-size / --max-length")  # fmt: skip


def parse_budget(text: str, device) -> float:
    """Bytes of a --max-memory value: GB (1e9 bytes), or "auto": the GPU's free memory less AUTO_MARGIN."""
    import torch

    device = torch.device(device)
    if text == "auto":
        if device.type != "cuda":
            raise BudgetError(f"--max-memory auto reads a GPU's free memory, and the run is on {device}: give GB")
        free, _ = torch.cuda.mem_get_info(device)
        return free * (1 - AUTO_MARGIN)
    try:
        gb = float(text)
    except ValueError:
        raise BudgetError(f"--max-memory {text!r}: a number of GB (e.g. 16) or 'auto'") from None
    if gb <= 0:
        raise BudgetError(f"--max-memory {text}: a positive number of GB")
    return gb * 1e9
