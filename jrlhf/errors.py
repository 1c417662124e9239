"""Exception types for user-facing errors (bad config, data, checkpoints, non-finite losses)."""

from __future__ import annotations


class JrlhfError(Exception):
    """Base of jrlhf's user-facing errors: the message names the offending field and the fix."""


class NonFiniteLossError(JrlhfError):
    """The loss or the gradients became NaN/inf; the message names the step."""


# What the CLI reports as a one-line error (set JRLHF_TRACEBACK=1 for the full traceback).
USER_ERRORS = (JrlhfError, ValueError, FileNotFoundError)
