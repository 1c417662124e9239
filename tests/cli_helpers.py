"""Helpers of the CLI error tests: run ``jrlhf train sft`` in-process and check a one-line error."""

from jrlhf import cli


def run_cli(capsys, *argv):
    """``(exit status, stdout, stripped stderr)`` of ``jrlhf train sft ARGV``."""
    status = cli.main(["train", "sft", *argv])
    out, err = capsys.readouterr()
    return status, out, err.strip()


def assert_one_line_error(status, err, *needles):
    """Exit status 2 and one ``jrlhf: error:`` line without a traceback that contains every needle."""
    assert status == 2, err
    assert err.startswith("jrlhf: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
