"""The one exception type for problems a user can fix (bad input, bad params, no memory).

Stage entry points print these without a traceback: the message already says what is wrong and
what to do. Anything else is a bug in loraflow and keeps its traceback.
"""


class LoraflowError(Exception):
    """A problem in the user's input or settings; the message says what and how to fix it."""
