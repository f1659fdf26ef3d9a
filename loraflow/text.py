"""Text normalization shared by near-duplicate detection, leakage checks and the echo audit."""


def squash(text: str) -> str:
    """Lower-cased, with every run of whitespace made one space: texts that differ only in case
    and spacing compare equal."""
    return " ".join(text.split()).casefold()
