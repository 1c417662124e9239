"""Exception types for user-facing errors (bad config, data, checkpoints, non-finite losses); the CLI's exit codes."""

from __future__ import annotations


class JrlhfError(Exception):
    """Base of jrlhf's user-facing errors: the message names the offending field and the fix."""


class NonFiniteLossError(JrlhfError):
    """The loss or the gradients became NaN/inf; the message names the step and the last good checkpoint."""


class RunLockedError(JrlhfError):
    """Another live run holds ``train.output_dir``; the message names its process, host and the lock file."""


class CheckpointSaveError(JrlhfError):
    """A checkpoint could not be written (disk full, I/O error); the message names the step, the cause and the last
    good checkpoint, which is left intact."""


class ModelFileError(JrlhfError, ValueError):
    """A file of a Hugging Face model directory is unreadable, truncated, malformed or refused; the message names it."""


# What the CLI reports as a one-line error (set JRLHF_TRACEBACK=1 for the full traceback).
USER_ERRORS = (JrlhfError, ValueError, FileNotFoundError)

# Exit statuses of ``jrlhf train`` (documented in the README's "Command line" section).
EXIT_OK = 0  # trained to train.steps, evaluated and exported
EXIT_CRASH = 1  # unexpected error (traceback printed); the latest state was saved where possible (see the log)
EXIT_USER_ERROR = 2  # a one-line error: bad config/data/checkpoint, run directory in use, save failed, non-finite loss
EXIT_STOPPED = 3  # stopped by SIGTERM/SIGINT after saving the latest state: rerun the same command to resume
EXIT_INTERRUPTED = 130  # Ctrl-C before training started. A second SIGINT/SIGTERM during a run ends the process by that
# signal (130 / 143): quit at once, the in-flight save abandoned, the last complete checkpoint kept
