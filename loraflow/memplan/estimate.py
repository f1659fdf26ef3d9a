"""The estimate: predicted peak bytes of one training step, by part, from the model's shapes and one
Setup. Every formula is bytes per parameter or per token; the package docstring says where each comes from."""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model types whose decoder layer normalizes the MLP's output before adding it to the residual
MLP_OUTPUT_NORMED = frozenset({"gemma2", "gemma3", "gemma3_text", "olmo2", "olmo3"})


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
    # a norm reads the MLP's output before the residual sum (Gemma 2 and 3, OLMo 2), so a recompute
    # must compute down_proj's output (loraflow/offload.py finds this at run time; the plan foresees it)
    mlp_output_normed: bool = False

    @classmethod
    def from_config(cls, config) -> "Arch":
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   mlp_output_normed=getattr(config, "model_type", "") in MLP_OUTPUT_NORMED)

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
    offload_checkpoints: bool = False    # checkpointed layers' inputs wait in CPU memory (loraflow/offload.py)
    stashed_outputs: int = 0             # of those layers, how many keep their up_proj output there too
    embedding_frozen: bool = True        # no adapter on the input embedding, and not trained in full
    trainable_tokens: int = 0            # token rows of the embedding and the head trained (PEFT trainable tokens)

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

def trains_embedding(s: Setup) -> bool:
    """Whether the input embedding takes gradients: adapted, trained in full, or some of its rows."""
    return not s.embedding_frozen or "embed_tokens" in s.modules_to_save or s.trainable_tokens > 0


def trains_head(s: Setup) -> bool:
    return "lm_head" in s.modules_to_save or s.trainable_tokens > 0


def embedding_can_leave_gpu(arch: Arch, s: Setup) -> bool:
    """The input embedding may live in CPU memory when it is frozen, not shared with the output head,
    and not sharded."""
    return not trains_embedding(s) and not arch.tied and s.shards == 1

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
    # fp32 weights and grads; one copy in the compute dtype: fused_lora's cast weights, kept between
    # optimizer steps (peft's path casts per use under autocast instead, a copy at a time)
    cast_copy = 2 if s.act_bytes == 2 else 0
    lora = adapter_params(arch, s) * (4 + 4 + moments + cast_copy)
    # a trained copy of the module in the weight dtype, its grad, and two moments in that dtype (or 8-bit)
    full_moments = 2 if s.optimizer == "adamw_8bit" else 2 * s.act_bytes
    full = saved_module_params(arch, s) * (2 * s.act_bytes + full_moments)
    token_rows = s.trainable_tokens * arch.hidden * (1 if arch.tied else 2)
    return (lora + full + token_rows * (2 * s.act_bytes + full_moments)) / s.shards  # FULL_SHARD splits them with the weights


def token_rows_working_bytes(arch: Arch, s: Setup) -> float:
    """Training a few token rows costs whole matrices for the step: PEFT writes the trained rows into
    a copy of the weight in every forward (index_copy), and autograd makes a dense gradient of that
    copy before picking the rows out. The head's copy lives from forward to backward beside its
    gradient; the embedding's dense gradient comes in backward (tied: one matrix serves both)."""
    if not s.trainable_tokens:
        return 0.0
    return (2 if arch.tied else 3) * arch.vocab * arch.hidden * s.act_bytes

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
    checkpointed_input = 0 if s.offload_checkpoints else a * arch.hidden
    layers = kept * layer_saved_bytes(arch, s) + s.checkpoint_layers * checkpointed_input
    if s.checkpoint_layers == 0 and not trains_embedding(s):
        # a frozen embedding's output needs no grad, so the first norm keeps nothing (checkpointing
        # turns input grads on, but then the first layer is a checkpointed one)
        layers -= norm_saved_bytes(arch, s)
    shared = 2 * a * arch.head_dim + 8
    final_norm = norm_saved_bytes(arch, s)
    head_input = a * arch.hidden if trains_head(s) else 0
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
    if s.offload_checkpoints and s.checkpoint_layers:
        per_token += 2 * a * arch.hidden  # the input being recomputed and the one fetched ahead
    if s.stashed_outputs:
        per_token += a * arch.intermediate  # the next layer's stashed up_proj output, fetched ahead
    dequant = 0
    if s.method in ("lora8", "qlora"):
        dequant = max(x * y for x, y in arch.linear_shapes().values()) * 2
    return per_token * s.tokens + dequant

def backward_phases(arch: Arch, s: Setup) -> tuple[float, float]:
    """Activations and working set at the peak of backward, which comes in one of two phases. The
    checkpointed layers are the first ones (loraflow.fastpath.checkpoint_layers), so backward meets the
    kept layers first: while they run, every activation is alive but nothing is recomputed; by the
    first recompute their activations are freed. On the H200 the sum of both (the plan before) erred
    high by 8-10.5% wherever some layers were kept (T2, T4); the larger phase errs high by 0.4-4.2% on
    the same eight measured runs (benchmarks/results/train-h200-run1*.jsonl)."""
    activations = activation_bytes_per_token(arch, s) * s.tokens
    working = working_bytes(arch, s)
    kept = arch.layers - s.checkpoint_layers
    if not s.checkpoint_layers or not kept:
        return activations, working
    layer = layer_saved_bytes(arch, s) * s.tokens
    kept_phase = (activations, working - layer)  # the recomputed layer's saved tensors are not there yet
    recompute_phase = (activations - kept * layer, working)
    return max(kept_phase, recompute_phase, key=sum)


def estimate(arch: Arch, s: Setup) -> dict[str, float]:
    """Predicted peak bytes, by part: the activations and working set of the phase of backward where
    they are largest together (backward_phases)."""
    activations, working = backward_phases(arch, s)
    parts = {
        "weights": weight_bytes(arch, s),
        "adapter": adapter_bytes(arch, s),
        "activations": activations,
        "logits_loss": loss_bytes_per_token(arch, s) * s.tokens,
        "working_set": working,
    }
    if s.trainable_tokens:
        parts["token_rows"] = token_rows_working_bytes(arch, s)
    if s.shards > 1:
        parts["fsdp_gathered"] = fsdp_gather_bytes(arch, s)
    parts["peak"] = max(sum(parts.values()), optimizer_step_bytes(arch, s))
    return parts


# values per staging copy of loraflow.flat_adamw8bit (the 8-bit AdamW's flat update): fp32 parameters
# and as many gradients, alive only inside the optimizer step
FLAT_8BIT_STAGING_VALUES = 1 << 22


def optimizer_step_bytes(arch: Arch, s: Setup) -> float:
    """What the optimizer step holds: it comes after backward has freed every activation and working
    tensor, so only the weights, the adapter and the 8-bit update's staging pair (one process; FSDP
    keeps bitsandbytes' own update) are there. It sets the peak only for very small activations."""
    staging = 0.0
    if s.optimizer == "adamw_8bit" and s.shards == 1:
        staging = 2 * 4 * min(FLAT_8BIT_STAGING_VALUES, adapter_params(arch, s))
    return weight_bytes(arch, s) + adapter_bytes(arch, s) + staging
