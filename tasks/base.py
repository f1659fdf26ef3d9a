"""base stage: make models/base usable by every later stage.

    python -m tasks.base        (or: dvc repro base)

For `base.source: bundled` it builds the offline default: a byte-level BPE tokenizer trained on
data/base_corpus.txt with a chat template, and a small Llama pretrained briefly on the same corpus,
so the base knows the facts but not the chat format. For a local path or hub id it writes only
models/base/reference.json (the weights stay where they are); the loading code is the same.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from loraflow import layout
from loraflow.artifacts import atomic_path, sha256_tree, write_json
from loraflow.modeling import REFERENCE_FILE, BaseRef, load_tokenizer
from loraflow.errors import LoraflowError
from loraflow.params import BaseParams, BundledBase
from loraflow.stage import main

log = logging.getLogger("loraflow.base")

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
EOS = "<|end|>"
# Each turn is "<|role|>\n{content}<|end|>"; nothing follows <|end|>, so the trainable span of an
# assistant turn ends exactly on its end-of-turn token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token="<|pad|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=2048)


def build_model(tokenizer, shape: BundledBase):
    """A randomly initialised decoder of the shape's architecture (Llama by default; Qwen3 and Gemma-3
    to run the whole pipeline on another family's code offline)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(shape.seed)
    config = AutoConfig.for_model(
        shape.architecture, vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads // 2,
        head_dim=shape.hidden_size // shape.num_heads, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config)


def pretrain(model, tokenizer, corpus: list[str], shape: BundledBase, seq_len: int = 48, batch: int = 16) -> list[float]:
    """Plain next-token pretraining on shuffled corpus text; returns the loss every 25 steps."""
    import torch

    rng = random.Random(shape.seed)
    lines = list(corpus)
    stream: list[int] = []
    for _ in range(8):  # several shuffled passes, so windows mix different facts
        rng.shuffle(lines)
        # Documents end with the end-of-text token, as in real pretraining: the base learns to stop.
        # verbose=False: the stream is longer than the model's context on purpose (it is cut into
        # windows below), so the tokenizer's "sequence length is longer" warning is not for us.
        stream += tokenizer(EOS.join(lines) + EOS, add_special_tokens=False, verbose=False)["input_ids"]
    data = torch.tensor(stream)
    # fused: its update divides by correctly rounded square roots; the single-tensor AdamW takes them from
    # MKL's vector math, whose last bit depends on the processor (README, "Determinism")
    opt = torch.optim.AdamW(model.parameters(), lr=shape.pretrain_lr, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=shape.pretrain_lr, total_steps=max(shape.pretrain_steps, 1),
                                                pct_start=0.1)
    gen = torch.Generator().manual_seed(shape.seed)
    losses = []
    model.train()
    started = time.perf_counter()
    for step in range(shape.pretrain_steps):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == shape.pretrain_steps - 1:
            losses.append(round(loss.item(), 4))
            left = (time.perf_counter() - started) / (step + 1) * (shape.pretrain_steps - step - 1)
            log.info("pretrain step %d/%d loss %.3f, about %.0f s left", step + 1, shape.pretrain_steps, loss.item(), left)
    model.eval()
    return losses


def read_corpus(path: Path) -> list[str]:
    """data/base_corpus.txt's documents: paragraphs, separated by a blank line (a document may span lines)."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def build_bundled(shape: BundledBase, corpus_path: Path, out_dir: Path) -> dict:
    import torch

    torch.manual_seed(shape.seed)
    corpus = read_corpus(corpus_path)
    tokenizer = train_tokenizer(corpus, shape.vocab_size)
    model = build_model(tokenizer, shape)
    losses = pretrain(model, tokenizer, corpus, shape)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / layout.BUILD_INFO.name, {"corpus": str(corpus_path), "corpus_sha256": sha256_tree(corpus_path),
                                             "shape": shape.model_dump(), "pretrain_losses": losses})
    return {"source": "bundled", "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "pretrain_loss_first": losses[0] if losses else None,
            "pretrain_loss_last": losses[-1] if losses else None}


def looks_like_a_path(source: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (absolute, relative, deeper) names a directory."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or Path(source).is_dir()


def write_reference(params: BaseParams, out_dir: Path) -> dict:
    if looks_like_a_path(params.source) and not Path(params.source).expanduser().is_dir():
        raise LoraflowError(f"base.source: {params.source} is not a directory here (a local model path). Fix "
                            "the path, or give a hub id such as meta-llama/Llama-3.1-8B-Instruct")
    ref = BaseRef(params.source, params.revision, params.trust_remote_code)
    load_tokenizer(ref)  # fail here, early and clearly, if the source is unusable
    info = {"source": params.source, "revision": params.revision, "trust_remote_code": params.trust_remote_code}
    if Path(params.source).is_dir():
        info["content_sha256"] = sha256_tree(params.source)  # a local path can change under the same name
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_json(tmp / REFERENCE_FILE, info)
    return info


def run(params: BaseParams) -> dict:
    if params.source == "bundled":
        return build_bundled(params.bundled, layout.BASE_CORPUS, layout.BASE_DIR)
    return write_reference(params, layout.BASE_DIR)


if __name__ == "__main__":
    main("base", run)
