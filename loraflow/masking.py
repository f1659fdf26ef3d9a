"""The masking primitive: which characters of a rendered conversation are trainable, and which
tokens that makes trainable. Pure functions, tested on toy conversations and on the real chat
templates of the major model families (tests/test_templates.py).

The whole conversation is rendered once, and every turn is located in that one text, in order:
an assistant turn's span covers its content as the template wrote it, plus the end-of-turn text
that follows it. Nothing depends on the template rendering a conversation's prefixes as prefixes,
so templates that fold the system prompt into a later turn (Mistral), drop or move reasoning
(Qwen3, DeepSeek-R1) or insert text of their own (an empty `<think></think>` block) are masked
exactly: text the template inserts is context, never trained.

The end-of-turn text is read off the template itself (`end_of_turn_text`): what it writes after an
assistant turn's content, both mid-conversation and at the end.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from loraflow.errors import LoraflowError

IGNORE_INDEX = -100
Render = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Probe contents for reading the template's structure: strings no real data row contains.
PROBE_FIRST, PROBE_SECOND, PROBE_USER0, PROBE_USER = "loraflowprobeA7", "loraflowprobeB7", "loraflowprobeV7", "loraflowprobeU7"


class RowError(ValueError):
    """One row the template cannot render or mask: the row goes to the rejects with this reason."""


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[tuple[int, int]]
    prompt: str
    """The eval prompt: the text before the last assistant turn's trained span, i.e. the context the
    model was trained to answer from (the template's generation prompt plus anything the template
    inserts there, such as Qwen3's empty reasoning block)."""


def probe_text(render: Render) -> str:
    probe = [{"role": "user", "content": PROBE_USER0}, {"role": "assistant", "content": PROBE_FIRST},
             {"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_SECOND}]
    try:
        return render(probe, False)
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception is a plain Exception
        raise LoraflowError(f"the chat template cannot render a plain user/assistant conversation: {e}") from None


def end_of_turn_text(render: Render) -> str:
    """What the template writes right after an assistant turn's content: the part shared by the text
    between that turn and the next user turn, and the text after a final assistant turn, less
    trailing whitespace (a newline after `<|im_end|>` is layout, not the turn's end)."""
    text = probe_text(render)
    first_end = text.index(PROBE_FIRST) + len(PROBE_FIRST)
    between = text[first_end:text.index(PROBE_USER, first_end)]
    trailer = text[text.rindex(PROBE_SECOND) + len(PROBE_SECOND):]
    # up to the first newline: text after it is the next turn's layout (Phi-3 writes <|end|>\n<|user|>
    # mid-conversation and <|end|>\n<|endoftext|> at the end, which share "<|end|>\n<|")
    return os.path.commonprefix([between, trailer]).split("\n", 1)[0].rstrip()


def user_turn_end(render: Render) -> str:
    """What the template writes between a user turn's content and the assistant's answer (the user's
    end and the assistant's header), as shared by a mid-conversation and a final exchange. A user
    turn is located only where this follows it, so a short answer is never found inside a header
    ("end" inside "<|end|>") or a user turn inside template text."""
    text = probe_text(render)
    user0_end = text.index(PROBE_USER0) + len(PROBE_USER0)
    user_end = text.index(PROBE_USER) + len(PROBE_USER)
    return os.path.commonprefix([text[user0_end:text.index(PROBE_FIRST, user0_end)],
                                 text[user_end:text.index(PROBE_SECOND, user_end)]])


def split_reasoning(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant message written as `<think>...</think>answer`; reasoning is
    None when there is no such block."""
    if THINK_CLOSE not in content:
        return None, content
    head, answer = content.rsplit(THINK_CLOSE, 1)
    return head.split(THINK_OPEN, 1)[-1], answer


def _find_content(text: str, content: str, start: int, followed_by: str = "") -> tuple[int, int] | None:
    """The first place at or after `start` where `content` stands in `text`, as written or trimmed
    (templates trim), followed by `followed_by` (after whitespace the content itself ended with)."""
    best = None
    for needle in dict.fromkeys((content, content.strip())):
        if not needle:
            continue
        at = text.find(needle, start)
        while at >= 0 and (best is None or at < best[0]):
            if text.startswith(followed_by, _skip_trailing(text, at + len(needle), content)):
                best = (at, at + len(needle))
                break
            at = text.find(needle, at + 1)
    return best


def _skip_trailing(text: str, end: int, content: str) -> int:
    """Past the whitespace at `end` that the content itself ended with (a template that trims drops it)."""
    k, trailing = end, len(content) - len(content.rstrip())
    while k < len(text) and k - end < trailing and text[k].isspace():
        k += 1
    return k


def render_spans(render: Render, messages: list[dict], end_of_turn: str, train_on: str = "all_assistant",
                 first_trainable: int = 0, user_end: str = "") -> Rendered:
    """The text of the whole conversation, the trainable (start, end) character spans, and the eval prompt.

    Turns before `first_trainable` are context only: prompt/completion rows train their completion
    and never the assistant turns quoted in their prompt, as TRL's completion-only loss does.
    Raises RowError when the template refuses the row or drops an assistant turn's answer.
    """
    try:
        text = render(messages, False)
    except Exception as e:  # noqa: BLE001 - jinja's TemplateError and the template's raise_exception
        raise RowError(f"the chat template refuses this row: {e}") from None
    trainable = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trainable]
    trainable = set(trainable[-1:] if train_on == "last_assistant" else trainable)
    spans, starts, unlocated, pos = [], {}, [], 0
    for i, message in enumerate(messages):
        if message["role"] == "system":
            unlocated.append(message)
            continue  # templates move it (into the first or the last user turn, or before the BOS)
        assistant = message["role"] == "assistant"
        reasoning, answer = split_reasoning(message["content"]) if assistant else (None, message["content"])
        follow = end_of_turn if assistant else user_end if message["role"] == "user" else ""
        found = _find_content(text, message["content"], pos, follow)
        if found is None and reasoning is not None:  # the template rewrote the reasoning block: the answer follows it
            at = text.find(reasoning.strip(), pos) if reasoning.strip() else -1
            found = _find_content(text, answer, at + len(reasoning.strip()) if at >= 0 else pos, follow)
        if found is None:
            if assistant and _find_content(text, answer, pos):
                raise RowError(f"assistant turn {i} is not followed by the end-of-turn {end_of_turn!r} in the "
                               f"rendered text, so the model could not learn to stop there")
            if assistant:
                raise RowError(f"assistant turn {i} does not appear in the rendered text: the chat template "
                               f"rewrites it, so its tokens cannot be located")
            unlocated.append(message)
            continue  # a user turn the template rewrote: only assistant turns need a position
        start, end = found
        if message["role"] == "assistant":
            start = _reasoning_start(text, reasoning, pos, start)
            end = _end_of_turn_end(text, end, message["content"], end_of_turn, i)
            starts[i] = start
            if i in trainable:
                spans.append((start, end))
        pos = end
    last = len(messages) - 1
    if last not in starts:
        return Rendered(text, spans, _generation_prompt(render, messages))
    prompt = text[:starts[last]]
    generation_prompt = _generation_prompt(render, messages)
    if _drops_context(text, generation_prompt, [m for m in unlocated if m is not messages[-1]]):
        return _rendered_from_generation_prompt(generation_prompt, text, spans, starts[last], end_of_turn)
    return Rendered(text, spans, prompt)


def _drops_context(text: str, generation_prompt: str, unlocated: list[dict]) -> bool:
    """True when the whole conversation's text lacks a turn that the template's generation prompt has:
    Mistral's templates write the system prompt only into the last user turn of a prompt, so a
    conversation ending with the answer renders without it. Training on that text would teach the
    model to answer without the system prompt it is always served with. Only the turns that were not
    located are looked for (the system prompt, rewritten user turns), so a long row stays linear."""
    return any(m["content"].strip() and m["content"].strip() not in text and m["content"].strip() in generation_prompt
               for m in unlocated)


def _rendered_from_generation_prompt(generation_prompt: str, text: str, spans: list[tuple[int, int]],
                                     last_start: int, end_of_turn: str) -> Rendered:
    """The last turn rendered after the template's own generation prompt (what the model is served
    with), keeping the spans of earlier turns found in that prompt."""
    answer = text[last_start:spans[-1][1]] if spans and spans[-1][0] == last_start else text[last_start:]
    full = generation_prompt + answer
    earlier = [s for s in spans if s[0] != last_start]
    moved = []
    for a, b in earlier:  # earlier assistant turns, located again in the generation prompt, in order
        at = full.find(text[a:b], moved[-1][1] if moved else 0)
        if at >= 0:
            moved.append((at, at + b - a))
    last = [(len(generation_prompt), len(full))] if spans and spans[-1][0] == last_start else []
    return Rendered(full, moved + last, generation_prompt)


def _reasoning_start(text: str, reasoning: str | None, search_from: int, answer_start: int) -> int:
    """Where the turn starts when the template renders its reasoning block too (Qwen3's last turn):
    at that block's `<think>`. Blocks the template inserts on its own are empty and stay context."""
    if not reasoning or not reasoning.strip():
        return answer_start
    at = text.rfind(reasoning.strip(), search_from, answer_start)
    opening = text.rfind(THINK_OPEN, search_from, at) if at >= 0 else -1
    return opening if opening >= 0 else answer_start


def _end_of_turn_end(text: str, content_end: int, content: str, end_of_turn: str, turn: int) -> int:
    """The end of the turn's end-of-turn text, which follows the content (after any whitespace the
    content itself ended with)."""
    k = _skip_trailing(text, content_end, content)
    if not end_of_turn:
        return k
    if not text.startswith(end_of_turn, k):
        raise RowError(f"assistant turn {turn} is not followed by the end-of-turn {end_of_turn!r} in the "
                       f"rendered text, so the model could not learn to stop there")
    return k + len(end_of_turn)


def _generation_prompt(render: Render, messages: list[dict]) -> str:
    """The prompt for a row that does not end with an assistant turn: the template's own."""
    try:
        return render(messages[:-1], True)
    except Exception as e:  # noqa: BLE001
        raise RowError(f"the chat template refuses this row's prompt: {e}") from None


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
