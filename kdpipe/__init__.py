"""kdpipe: offline knowledge distillation with cached teacher logits."""

__version__ = "0.1.0"


class KDPipeError(Exception):
    """An error caused by the user's input or files, reported as one line without a traceback."""
