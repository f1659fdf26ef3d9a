"""The generation audit: flags on one generated answer. Pure functions, tested on toy strings."""
from __future__ import annotations

from collections import Counter

from loraflow.text import squash

FLAGS = ("empty", "prompt_echo", "repetition_loop", "no_eos")


def repeats_ngram(text: str, n: int, min_repeats: int) -> bool:
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= min_repeats


def echoes_prompt(output: str, prompt_text: str, min_chars: int) -> bool:
    """The output repeats min_chars or more characters of the prompt verbatim (whitespace-normalized)."""
    out, prompt = squash(output), squash(prompt_text)
    if len(out) < min_chars:
        return False
    return any(out[i:i + min_chars] in prompt for i in range(0, len(out) - min_chars + 1))


def audit_flags(output: str, ended: bool, prompt_text: str, *, ngram: int, min_repeats: int, echo_min_chars: int) -> list[str]:
    flags = []
    if not output.strip():
        flags.append("empty")
    if echoes_prompt(output, prompt_text, echo_min_chars):
        flags.append("prompt_echo")
    if repeats_ngram(output, ngram, min_repeats):
        flags.append("repetition_loop")
    if not ended:
        flags.append("no_eos")
    return flags
