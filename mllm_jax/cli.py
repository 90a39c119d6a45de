"""What the command-line entry points (train.py, generate.py, python -m mllm_jax.hf.export) share: a refused input
is one line, "error: <type>: <what and the value given>", and exit status 1; --traceback shows the whole trace."""

from __future__ import annotations

import sys
from typing import Callable

# What a user's input can be refused with (the library's messages name the value).
USER_ERRORS = (ValueError, RuntimeError, FileNotFoundError)


def one_line_errors(run: Callable[[], int], *, traceback: bool) -> int:
    """``run()``'s exit status, or 1 after printing a refused input's one-line error (re-raised when ``traceback``)."""
    try:
        return run()
    except USER_ERRORS as e:
        if traceback:
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
