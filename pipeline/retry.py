"""Retry with exponential backoff for object-store calls that can fail transiently.

An S3 server restarting, a dropped connection or a 503 throttle should cost a few seconds,
not a run. A missing object, a permission error or a bad argument will not get better by
waiting, so they are raised at once.

    from pipeline.retry import with_retries
    with_retries(lambda: fs.pipe_file(path, data), what=f"writing {path}")
"""
from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from pipeline.redact import redact_text

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ATTEMPTS = 5
DEFAULT_FIRST_BACKOFF_S = 0.5
DEFAULT_MAX_BACKOFF_S = 8.0

# Errors that describe the request, not the weather: retrying cannot help.
PERMANENT_ERRORS: tuple = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                           ValueError, TypeError, KeyError)


class RetriesExhausted(RuntimeError):
    """A transient error outlasted every retry; the message says what and how often."""


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: network, timeouts, server-side 5xx and throttling."""
    return isinstance(exc, Exception) and not isinstance(exc, PERMANENT_ERRORS)


def backoff_delays(attempts: int, first_s: float, max_s: float) -> list:
    """The sleeps between ``attempts`` tries: first_s, 2*first_s, ... capped at max_s."""
    return [min(max_s, first_s * 2**i) for i in range(max(0, attempts - 1))]


def with_retries(
    call: Callable[[], T],
    *,
    what: str,
    attempts: int = DEFAULT_ATTEMPTS,
    first_backoff_s: float = DEFAULT_FIRST_BACKOFF_S,
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
    retry_if: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Return ``call()``, retrying transient failures with exponential backoff.

    Raises the error itself when ``retry_if`` says it is permanent, and ``RetriesExhausted``
    (chained to the last error) when every attempt failed. ``what`` names the operation in
    logs and messages; it and the error text are scrubbed of credentials.
    """
    delays = backoff_delays(attempts, first_backoff_s, max_backoff_s)
    for attempt, delay in enumerate([*delays, None], start=1):
        try:
            return call()
        except BaseException as exc:
            if not retry_if(exc):
                raise
            if delay is None:
                raise RetriesExhausted(
                    redact_text(f"{what}: failed {attempts} times over {sum(delays):.1f}s; "
                                f"last error {type(exc).__name__}: {exc}")
                ) from exc
            log.warning("%s: attempt %d of %d failed (%s: %s); retrying in %.1fs",
                        redact_text(what), attempt, attempts, type(exc).__name__, redact_text(str(exc)), delay)
            sleep(delay)
    raise AssertionError("unreachable")
