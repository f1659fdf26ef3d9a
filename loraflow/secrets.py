"""Keep tokens and secrets out of logs and reports.

Redacts well-known token shapes (Hugging Face, OpenAI-style, GitHub, AWS access keys) and the
value of every environment variable whose name says it is secret, wherever loraflow writes a log
line or a report.
"""
from __future__ import annotations

import logging
import os
import re

TOKEN_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})\b")
SECRET_NAMES = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
MASK = "[REDACTED]"


def _secret_values() -> list[str]:
    return sorted((v for k, v in os.environ.items() if SECRET_NAMES.search(k) and len(v) >= 8), key=len, reverse=True)


def redact(text: str) -> str:
    for value in _secret_values():
        text = text.replace(value, MASK)
    return TOKEN_SHAPES.sub(MASK, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True
