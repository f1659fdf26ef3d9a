"""The memory plan: peak GPU memory of a LoRA training step, predicted from the model's config before
any weight is loaded, and the fastest settings that fit a budget.

    peak = weights + adapter + saved activations + logits/loss + working set

Each term is bytes per parameter or bytes per token, from what the step keeps alive:
- weights: bf16 (lora), int8 + one fp32 scale per output row (lora8), or nf4 packed two per byte
  with 8-bit block scales and fp32 second-level scales (qlora, double quant); embeddings, the
  output head and norms stay bf16, as bitsandbytes leaves them. The frozen input embedding may be
  kept in CPU memory instead (embedding_on_cpu: 1 GiB at 8B, a fifth of a QLoRA base).
- adapter: LoRA A/B in fp32 (peft's default), their fp32 grads, the optimizer's two moments, and
  the bf16 copy autocast keeps for the step. modules_to_save are whole copies in the weight dtype.
- activations: the tensors autograd saves per token in a LLaMA-style decoder layer (listed in
  `layer_saved_bytes`); a checkpointed layer keeps only its input.
- logits/loss: a fused linear cross-entropy keeps one hidden-sized gradient per token; the plain
  path keeps fp32 log-probabilities over the vocabulary and their gradients.
- working set: the gradients alive while one layer runs backward, one recomputed layer when any is
  checkpointed, and one dequantized weight for 8-bit/4-bit bases.

The per-token terms are checked against autograd's saved-tensor hooks on CPU (tests/test_memplan.py)
and the whole peak against torch.cuda.max_memory_allocated on the H200
(benchmarks/results/train-h200.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GIB = 2**30
METHODS_FASTEST_FIRST = ("lora", "lora8", "qlora")
SAFETY_MARGIN = 0.10
"""Share of the budget kept free: the plan's stated accuracy, plus allocator fragmentation."""
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """The shapes that decide memory, read from a transformers config (LLaMA, Mistral, Qwen2 style)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> "Arch":
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embedding, output head and norms: the parameters bitsandbytes does not quantize."""
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()


@dataclass(frozen=True)
class Setup:
    """One training configuration to plan for."""
    method: str = "lora"                 # lora | lora8 | qlora
    tokens: int = 2048                   # tokens in one micro-batch (rows x longest row, or packed)
    checkpoint_layers: int = 0           # decoder layers recomputed in backward
    fused: bool = True                   # fused linear cross-entropy, and the fused layer kernels below
    fused_layers: bool = True            # fused RMSNorm/SwiGLU/RoPE (only with fused; see candidates())
    rank: int = 16
    targets: tuple[str, ...] = LINEAR_NAMES
    modules_to_save: tuple[str, ...] = ()
    optimizer: str = "adamw"             # adamw (fp32 moments) | adamw_8bit
    act_bytes: int = 2                   # compute dtype: 2 for bf16/fp16, 4 for fp32
    double_quant: bool = True
    shards: int = 1                      # FSDP processes (FULL_SHARD); 1: one GPU
    embedding_on_cpu: bool = False       # the frozen input embedding is looked up in CPU memory
    embedding_frozen: bool = True        # no adapter on the input embedding, and not trained in full


def linear_weight_bytes(arch: Arch, s: Setup) -> float:
    """The decoder layers' projection weights as the method stores them, all layers, unsharded."""
    linear = arch.linear_params()
    if s.method == "lora":
        return linear * s.act_bytes
    if s.method == "lora8":
        rows = arch.layers * sum(out for _, out in arch.linear_shapes().values())
        return linear * 1 + rows * 4
    if s.method == "qlora":
        scales = linear / 64 + linear / (64 * 256) * 4 if s.double_quant else linear / 64 * 4
        return linear * 0.5 + scales
    raise ValueError(f"unknown method {s.method!r}")


def embedding_can_leave_gpu(arch: Arch, s: Setup) -> bool:
    """The input embedding may live in CPU memory when it is frozen, not shared with the output head,
    and not sharded."""
    frozen = s.embedding_frozen and "embed_tokens" not in s.modules_to_save
    return frozen and not arch.tied and s.shards == 1


def weight_bytes(arch: Arch, s: Setup) -> float:
    """This GPU's share of the base weights (all of them on one GPU)."""
    on_cpu = arch.vocab * arch.hidden if s.embedding_on_cpu else 0
    return (linear_weight_bytes(arch, s) + (arch.other_params() - on_cpu) * s.act_bytes) / s.shards


def fsdp_gather_bytes(arch: Arch, s: Setup) -> float:
    """Under FSDP, the units gathered in full at once: the root unit (embeddings, final norm, lm_head)
    and two decoder layers (the one running and the one prefetched)."""
    if s.shards == 1:
        return 0.0
    return arch.other_params() * s.act_bytes + 2 * linear_weight_bytes(arch, s) / arch.layers


def adapter_params(arch: Arch, s: Setup) -> int:
    shapes = arch.linear_shapes()
    return arch.layers * sum(s.rank * (shapes[n][0] + shapes[n][1]) for n in s.targets if n in shapes)


def saved_module_params(arch: Arch, s: Setup) -> int:
    sizes = {"lm_head": arch.vocab * arch.hidden, "embed_tokens": arch.vocab * arch.hidden}
    return sum(sizes.get(m, 0) for m in s.modules_to_save)


def adapter_bytes(arch: Arch, s: Setup) -> float:
    moments = 2 if s.optimizer == "adamw_8bit" else 8
    autocast_copy = 2 if s.act_bytes == 2 else 0
    lora = adapter_params(arch, s) * (4 + 4 + moments + autocast_copy)
    # a trained copy of the module in the weight dtype, its grad, and two moments in that dtype (or 8-bit)
    full_moments = 2 if s.optimizer == "adamw_8bit" else 2 * s.act_bytes
    full = saved_module_params(arch, s) * (2 * s.act_bytes + full_moments)
    return (lora + full) / s.shards  # FULL_SHARD splits them with the weights


def norm_saved_bytes(arch: Arch, s: Setup) -> float:
    """What one RMSNorm keeps per token: fused, its input and an fp32 rstd; plain (HF computes in
    fp32), an fp32 copy of its input and the rstd."""
    return (s.act_bytes * arch.hidden + 4) if s.fused and s.fused_layers else (4 * arch.hidden + 4)


def layer_saved_bytes(arch: Arch, s: Setup) -> float:
    """Bytes per token that autograd keeps for one decoder layer that is not checkpointed:
    - each RMSNorm: norm_saved_bytes;
    - the two normed hidden states, inputs of the LoRA A matrices (8-bit bases keep them too);
    - attention: q, k, v, its output (also o_proj's input) and an fp32 log-sum-exp per head;
    - MLP: fused SwiGLU keeps gate and up; plain keeps gate, silu(gate) and up; plus their product,
      down_proj's input;
    - each adapted projection: its rank-r LoRA A output;
    - 8-bit bases: the int8 matmul's own fp16 copy of down_proj's input.
    """
    a, h, i = s.act_bytes, arch.hidden, arch.intermediate
    targets = set(s.targets)
    keep_all_inputs = s.method == "lora8"
    norm = norm_saved_bytes(arch, s)
    attn_in = a * h if keep_all_inputs or targets & {"q_proj", "k_proj", "v_proj"} else 0
    mlp_in = a * h if keep_all_inputs or targets & {"gate_proj", "up_proj"} else 0
    attention = a * (2 * arch.heads * arch.head_dim + 2 * arch.kv_heads * arch.head_dim) + 4 * arch.heads
    mlp = (2 if s.fused and s.fused_layers else 3) * a * i
    down_in = a * i if keep_all_inputs or "down_proj" in targets else 0
    if s.method == "lora8":
        # bitsandbytes' int8 matmul keeps a copy of down_proj's input of its own, beside the one the
        # adapter keeps (2 * intermediate bytes a token, measured by benchmarks/lora8_probe.py)
        down_in += 2 * i
    lora_mid = a * s.rank * len(targets & set(LINEAR_NAMES))
    return 2 * norm + attn_in + mlp_in + attention + mlp + down_in + lora_mid


def activation_bytes_per_token(arch: Arch, s: Setup) -> float:
    """All decoder layers, plus what every layer shares (rotary cos/sin, the input ids) and the final norm."""
    a = s.act_bytes
    kept = arch.layers - s.checkpoint_layers
    layers = kept * layer_saved_bytes(arch, s) + s.checkpoint_layers * a * arch.hidden
    if s.checkpoint_layers == 0 and "embed_tokens" not in s.modules_to_save:
        # a frozen embedding's output needs no grad, so the first norm keeps nothing (checkpointing
        # turns input grads on, but then the first layer is a checkpointed one)
        layers -= norm_saved_bytes(arch, s)
    shared = 2 * a * arch.head_dim + 8
    final_norm = norm_saved_bytes(arch, s)
    head_input = a * arch.hidden if "lm_head" in s.modules_to_save else 0
    return layers + shared + final_norm + head_input


def loss_bytes_per_token(arch: Arch, s: Setup) -> float:
    if s.fused:
        # the fused kernel computes d(loss)/d(hidden) in forward and keeps it; logits exist one chunk at a time
        return s.act_bytes * arch.hidden
    # fp32 log-probs kept for backward, the logits the model returns, and two fp32 gradients in backward
    return 4 * arch.vocab + s.act_bytes * arch.vocab + 8 * arch.vocab


def working_bytes(arch: Arch, s: Setup) -> float:
    """Alive only while one layer runs backward: gradients of its hidden states and MLP
    intermediates, the recomputed layer if it is checkpointed, a dequantized weight for kbit bases."""
    a = s.act_bytes
    per_token = a * (3 * arch.hidden + 3 * arch.intermediate)
    if s.checkpoint_layers:
        per_token += layer_saved_bytes(arch, s)
    dequant = 0
    if s.method in ("lora8", "qlora"):
        dequant = max(x * y for x, y in arch.linear_shapes().values()) * 2
    return per_token * s.tokens + dequant


def estimate(arch: Arch, s: Setup) -> dict[str, float]:
    """Predicted peak bytes, by part."""
    parts = {
        "weights": weight_bytes(arch, s),
        "adapter": adapter_bytes(arch, s),
        "activations": activation_bytes_per_token(arch, s) * s.tokens,
        "logits_loss": loss_bytes_per_token(arch, s) * s.tokens,
        "working_set": working_bytes(arch, s),
    }
    if s.shards > 1:
        parts["fsdp_gathered"] = fsdp_gather_bytes(arch, s)
    parts["peak"] = sum(parts.values())
    return parts


OCCUPANCY_TOKENS = 800
"""Micro-batch size at which a step runs at half its best rate per token: on the H200, 8B LoRA ran
2048-token micro-batches at 0.754 of the rate of 16384-token ones (benchmarks/results/train-h200-run1.jsonl),
and T / (T + 800) fits that ratio."""


EMBEDDING_ON_CPU_COST = 0.02
"""Share of step time the CPU lookup and copy of the input embedding's rows cost. On the H200, P2
(8B LoRA, 4 x 2048 tokens) with the embedding in CPU memory and one layer fewer checkpointed (1.0%
less work by relative_step_cost) ran 0.4% slower than with it on the GPU
(benchmarks/results/train-h200-run9-p1-p2.jsonl), so the move costs about 1.4%; 2% keeps the plan
from moving it for a gain that small."""


def relative_step_cost(arch: Arch, s: Setup) -> float:
    """Time per token relative to no recomputation at full occupancy: a frozen base costs ~2 units
    forward and ~2 backward, each checkpointed layer adds its forward again, small micro-batches
    leave the GPU partly idle, and the embedding in CPU memory adds its copy."""
    recompute = (4 + 2 * s.checkpoint_layers / arch.layers) / 4
    offload = 1 + EMBEDDING_ON_CPU_COST if s.embedding_on_cpu else 1
    return recompute * offload * (s.tokens + OCCUPANCY_TOKENS) / s.tokens


@dataclass(frozen=True)
class Choice:
    setup: Setup
    micro_batch: int
    parts: dict
    fits: bool


@dataclass
class Plan:
    arch: Arch
    chosen: Choice
    budget_bytes: float | None
    max_length: int
    rows_per_step: int
    considered: list[Choice]

    def to_dict(self) -> dict:
        c = self.chosen
        return {"arch": asdict(self.arch), "budget_gib": gib(self.budget_bytes), "safety_margin": SAFETY_MARGIN,
                "max_length": self.max_length, "rows_per_optimizer_step": self.rows_per_step,
                "fits": c.fits, "method": c.setup.method, "micro_batch": c.micro_batch,
                "grad_accum": self.rows_per_step // c.micro_batch, "checkpoint_layers": c.setup.checkpoint_layers,
                "fused": c.setup.fused, "fused_layers": c.setup.fused and c.setup.fused_layers,
                "tokens_per_micro_batch": c.setup.tokens, "gpus_sharing_weights": c.setup.shards,
                "embedding_on_cpu": c.setup.embedding_on_cpu,
                "predicted_gib": {k: gib(v) for k, v in c.parts.items()},
                "relative_step_cost": round(relative_step_cost(self.arch, c.setup), 3),
                "considered": len(self.considered)}


def gib(n: float | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


FUSED_LAYERS_MIN_TOKENS = 4096
"""Below this many tokens per micro-batch the fused layer kernels are left off: each Liger call costs
about 1 ms of host time (profiled on the H200, benchmarks/results/profile-qlora-p3-h200.txt, where
the GPU was busy 34% of an 8B QLoRA step at 2048 tokens), more than the plain ops' GPU time saves.
The fused cross-entropy is one call a step and stays on."""


def candidates(arch: Arch, base: Setup, max_length: int, rows_per_step: int, micro_batch: int | None,
               checkpoint_layers: int | None, methods: tuple[str, ...], place_embedding: bool = False) -> list[Choice]:
    """Every setting the plan may pick, fastest first: a cheaper method, then the lowest
    relative_step_cost (recomputation, micro-batch occupancy, the embedding's copy), then the
    embedding on the GPU. place_embedding: try the embedding in CPU memory as well as on the GPU;
    else keep base.embedding_on_cpu."""
    batches = [micro_batch] if micro_batch else [m for m in range(rows_per_step, 0, -1) if rows_per_step % m == 0]
    ckpts = [checkpoint_layers] if checkpoint_layers is not None else list(range(arch.layers + 1))
    if place_embedding and embedding_can_leave_gpu(arch, base):
        offloads = [False, True]
    else:
        offloads = [base.embedding_on_cpu]
    out = []
    for method in methods:
        for k in ckpts:
            for m in batches:
                for offload in offloads:
                    tokens = m * max_length
                    s = replace(base, method=method, checkpoint_layers=k, tokens=tokens, embedding_on_cpu=offload,
                                fused_layers=base.fused and tokens >= FUSED_LAYERS_MIN_TOKENS)
                    out.append(Choice(s, m, estimate(arch, s), False))
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(out, key=lambda c: (rank[c.setup.method], relative_step_cost(arch, c.setup),
                                      c.setup.embedding_on_cpu))


def make_plan(arch: Arch, base: Setup, max_length: int, rows_per_step: int, budget_bytes: float | None,
              micro_batch: int | None = None, checkpoint_layers: int | None = None,
              methods: tuple[str, ...] | None = None, place_embedding: bool = False) -> Plan:
    """The fastest candidate whose predicted peak fits the budget less the safety margin. With no
    budget (CPU) that is the fastest one. When none fits, the plan holds the smallest one, not fitting."""
    methods = methods or (base.method,)
    considered = candidates(arch, base, max_length, rows_per_step, micro_batch, checkpoint_layers, methods,
                            place_embedding)
    usable = None if budget_bytes is None else budget_bytes * (1 - SAFETY_MARGIN)
    marked = [replace(c, fits=usable is None or c.parts["peak"] <= usable) for c in considered]
    fitting = [c for c in marked if c.fits]
    chosen = fitting[0] if fitting else min(marked, key=lambda c: c.parts["peak"])
    return Plan(arch, chosen, budget_bytes, max_length, rows_per_step, marked)


def next_rung_down(plan: Plan) -> str:
    """What to try after running out of memory with this plan's setting."""
    s, arch = plan.chosen.setup, plan.arch
    if not s.embedding_on_cpu and embedding_can_leave_gpu(arch, s):
        return "the input embedding in CPU memory (train.embedding_on_cpu: true)"
    if s.checkpoint_layers < arch.layers:
        return f"checkpoint more layers (train.gradient_checkpointing: {min(arch.layers, s.checkpoint_layers + max(1, arch.layers // 4))})"
    if plan.chosen.micro_batch > 1:
        return f"a smaller micro-batch (train.micro_batch: {plan.chosen.micro_batch // 2})"
    lower = METHODS_FASTEST_FIRST[METHODS_FASTEST_FIRST.index(s.method) + 1:]
    if lower:
        return f"train.method: {lower[0]}"
    return "a shorter tokenize.max_length, or a GPU with more memory"


def render(plan: Plan) -> str:
    """The plan as a markdown table, for the log and reports/memory_plan.md."""
    c, arch = plan.chosen, plan.arch
    budget = ("none (CPU: no GPU memory to plan for)" if plan.budget_bytes is None
              else f"{gib(plan.budget_bytes):.2f} GiB (keeping {SAFETY_MARGIN:.0%} free)")
    shards = c.setup.shards
    per_gpu = f"; per GPU, sharded over {shards} GPUs (FSDP FULL_SHARD)" if shards > 1 else ""
    lines = [f"memory plan: {arch.layers} layers, hidden {arch.hidden}, vocab {arch.vocab}, "
             f"{arch.params() / 1e9:.3g} B params; budget {budget}{per_gpu}",
             "", "| part | GiB |", "|---|---|"]
    lines += [f"| {k} | {v / GIB:.3f} |" for k, v in c.parts.items()]
    verdict = "fits" if c.fits else "DOES NOT FIT"
    lines += ["", f"chosen: method {c.setup.method}, micro-batch {c.micro_batch} "
              f"(grad_accum {plan.rows_per_step // c.micro_batch}), {c.setup.tokens} tokens per micro-batch, "
              f"checkpointing {c.setup.checkpoint_layers}/{arch.layers} layers, "
              f"fused cross-entropy {'on' if c.setup.fused else 'off'}, fused layer kernels "
              f"{'on' if c.setup.fused and c.setup.fused_layers else 'off'}, input embedding "
              f"{'in CPU memory' if c.setup.embedding_on_cpu else 'on the GPU'}: {verdict}; "
              f"relative step cost {relative_step_cost(arch, c.setup):.2f}"]
    return "\n".join(lines)


def setup_for_params(params, act_bytes: int, fused: bool, shards: int = 1) -> Setup:
    """The Setup that TrainParams describe; checkpoint_layers and tokens are filled in by the plan."""
    targets = LINEAR_NAMES if params.target_modules == "all-linear" else tuple(
        n for n in LINEAR_NAMES if n in params.target_modules)
    method = "lora" if params.method == "auto" else params.method
    return Setup(method=method, fused=fused, rank=params.rank, targets=targets,
                 modules_to_save=tuple(params.modules_to_save), optimizer=params.optimizer, act_bytes=act_bytes,
                 shards=shards, embedding_on_cpu=params.embedding_on_cpu is True,
                 embedding_frozen=params.target_modules == "all-linear" or "embed_tokens" not in params.target_modules)


def fixed_checkpoint_layers(setting, layers: int) -> int | None:
    """params.gradient_checkpointing as a layer count; None when the plan picks (auto)."""
    if setting == "auto":
        return None
    if isinstance(setting, bool):
        return layers if setting else 0
    return max(0, min(int(setting), layers))


def plan_for_params(params, arch: Arch, max_length: int, act_bytes: int, fused: bool,
                    gpu_free_bytes: float | None, processes: int = 1, shards: int = 1) -> Plan:
    """The plan for one training process: the budget is params.memory_budget_gib, else the GPU's free
    memory, else (CPU) none. With several processes each takes batch_size * grad_accum / processes
    rows per step; `shards` of them share the weights (FSDP). method auto tries lora, lora8 and qlora,
    fastest first (GPU only; no lora8 when sharded)."""
    from loraflow.errors import LoraflowError
    total = params.batch_size * params.grad_accum
    if total % processes:
        raise LoraflowError(f"batch_size * grad_accum = {total} rows per step cannot be split evenly over "
                            f"{processes} GPUs (train.num_gpus); make it a multiple of {processes}")
    rows = total // processes
    micro = None if params.micro_batch == "auto" else params.micro_batch
    if micro is not None and rows % micro:
        raise LoraflowError(f"train.micro_batch={micro} must divide the {rows} rows per step of each "
                            f"process (batch_size * grad_accum / GPUs)")
    budget = params.memory_budget_gib * GIB if params.memory_budget_gib else gpu_free_bytes
    methods = None
    if params.method == "auto" and budget is not None:
        methods = tuple(m for m in METHODS_FASTEST_FIRST if shards == 1 or m != "lora8")
    base = setup_for_params(params, act_bytes, fused, shards)
    if base.embedding_on_cpu and not embedding_can_leave_gpu(arch, base):
        raise LoraflowError("train.embedding_on_cpu=true needs an input embedding that is frozen (not in "
                            "modules_to_save or target_modules), not tied to the output head, and not "
                            "sharded (num_gpus 1)")
    return make_plan(arch, base, max_length, rows, budget, micro_batch=micro,
                     checkpoint_layers=fixed_checkpoint_layers(params.gradient_checkpointing, arch.layers),
                     methods=methods, place_embedding=params.embedding_on_cpu == "auto")


# loraflow.generation prefills a batch in chunks of at most this many (padded) tokens
PREFILL_CHUNK_TOKENS = 16384


def generation_bytes(arch: Arch, batch: int, prompt_len: int, new_tokens: int, act_bytes: int = 2) -> float:
    """GPU memory greedy decoding needs beside the weights: the KV cache (every row's slot holds the
    longest prompt plus the new tokens), one layer's working tensors for a prefill chunk, and
    last-position logits (prefill keeps only those)."""
    cache = arch.layers * 2 * arch.kv_heads * arch.head_dim * (prompt_len + new_tokens) * batch * act_bytes
    chunk_tokens = min(batch * prompt_len, max(PREFILL_CHUNK_TOKENS, prompt_len))
    prefill = chunk_tokens * (3 * arch.intermediate + 4 * arch.hidden) * act_bytes
    logits = batch * arch.vocab * 4 * 2
    return cache + prefill + logits


def generation_batch(arch: Arch, prompt_len: int, new_tokens: int, free_bytes: float, rows: int,
                     act_bytes: int = 2, cap: int = 256) -> int:
    """The largest power-of-two batch (at most cap, and no more than the rows need) that fits the free
    memory less the safety margin."""
    batch = 1
    while (batch * 2 <= min(cap, max(rows, 1)) and
           generation_bytes(arch, batch * 2, prompt_len, new_tokens, act_bytes) <= free_bytes * (1 - SAFETY_MARGIN)):
        batch *= 2
    return batch
