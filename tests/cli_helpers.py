"""Shared helpers for CLI tests: bad input gives exactly one error line, no traceback; a
process started by a test is waited on until something it writes appears."""

import time


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def wait_while_running(proc, done, deadline):
    """Poll until ``done()`` holds, ``proc`` ends or ``deadline`` (a time.time()) passes."""
    while time.time() < deadline and proc.poll() is None and not done():
        time.sleep(0.02)
