"""The masking primitive: which characters of a rendered conversation are trainable, and which
tokens that makes trainable. Two pure functions, tested on toy conversations.

The spans come from the tokenizer's own chat template, rendered on growing prefixes of the
conversation: an assistant turn's span starts where the template's generation prompt for it ends,
and stops where the rendered turn ends, so it covers the turn's content and its end-of-turn token
and works for any template that renders prefixes as prefixes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from loraflow.errors import LoraflowError

IGNORE_INDEX = -100
Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text


def trainable_spans(render: Render, messages: list[dict], train_on: str = "all_assistant",
                    first_trainable: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the (start, end) character spans of the trainable assistant turns.

    Turns before `first_trainable` are context only: prompt/completion rows train their completion
    and never the assistant turns quoted in their prompt, as TRL's completion-only loss does.
    """
    text = render(messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trainable]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for i in turns:
        prompt = render(messages[:i], True)
        through_turn = text if i == len(messages) - 1 else render(messages[: i + 1], False)
        if not (through_turn.startswith(prompt) and text.startswith(through_turn)):
            raise LoraflowError(
                "the chat template does not render a conversation's prefixes as prefixes of its text, so "
                "assistant spans cannot be located (templates that drop or rewrite earlier turns, such as "
                "ones stripping past reasoning, need train_on: last_assistant)")
        spans.append((len(prompt), len(through_turn)))
    return text, spans


def labels_from_spans(input_ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                      spans: Sequence[tuple[int, int]]) -> list[int]:
    """A token is trained when it starts inside a span; every other label is IGNORE_INDEX."""
    return label_array(input_ids, offsets, spans).tolist()


def label_array(input_ids: Sequence[int], offsets: Sequence[tuple[int, int]],
                spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """labels_from_spans as an int32 array: what the tokenize stage stores (millions of Python ints
    would cost memory and garbage-collector time)."""
    ids = np.asarray(input_ids, dtype=np.int32)
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start, end = bounds[:, 0], bounds[:, 1]
    inside = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        inside |= (start >= a) & (start < b)
    return np.where(inside & (end > start), ids, IGNORE_INDEX).astype(np.int32)


def hf_render(tokenizer) -> Render:
    """The tokenizer's chat template as a Render function.

    It renders the compiled template exactly as apply_chat_template does (same template, same
    special-token variables), without that method's per-call argument handling, which costs more
    than the rendering on short rows. tests/test_masking.py checks the two agree.
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        compiled = _compile_jinja_template(tokenizer.get_chat_template())
    except (ImportError, AttributeError):  # another transformers layout: the public, slower path
        return lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    variables = dict(tokenizer.special_tokens_map)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    return render
