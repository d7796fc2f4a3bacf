"""The one base class of the errors bert_jax raises for bad input or state. Each job
prints such an error's message (which names the flag, file, line or value) and exits 1,
without a traceback; anything else is a bug and keeps its traceback."""


class BertJaxError(Exception):
    """Bad input or state, explained by the message."""
