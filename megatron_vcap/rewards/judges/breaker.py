"""Circuit breaker for a judge server that is unreachable (restarting, rescheduled, not up yet).

Connection-refused errors say nothing about a request and everything about the server, so they
must not burn each request's retries (issue 14, item 4: a 20 s restart failed 260 of 300
samples). The first refused connection opens the breaker; from then on requests wait instead
of connecting, and one request at a time probes the server, at growing intervals (from
``backoff_s``, doubling, at most ``_MAX_PROBE_INTERVAL_S``). The probe's first answer of any kind
closes the breaker and releases every waiter. An outage that lasts ``outage_timeout_s`` fails the
waiting requests; after that each new request is sent once and fails at once if the server is
still unreachable, until one gets through (so a judge that comes back is used again).

All methods run on the judge's event loop (no locks needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

log = logging.getLogger(__name__)

# A probe is one cheap connect attempt: probing every few seconds costs a down server nothing
# and bounds the time between its return and the judge noticing.
_MAX_PROBE_INTERVAL_S = 5.0


class ServerUnreachable(Exception):
    """The outage outlasted ``outage_timeout_s``; ``elapsed_s`` is how long it has lasted."""

    def __init__(self, elapsed_s: float):
        super().__init__(f"no connection for {elapsed_s:.0f} s")
        self.elapsed_s = elapsed_s


class CircuitBreaker:
    def __init__(self, outage_timeout_s: float, first_interval_s: float, clock=time.monotonic):
        self.outage_timeout_s = outage_timeout_s
        self.first_interval_s = max(first_interval_s, 0.01)
        self._clock = clock
        self.opened_at: float | None = None  # start of the current outage
        self._interval = self.first_interval_s
        self._next_probe = 0.0
        self._probing = False
        self._changed: asyncio.Event | None = None
        self.outages = 0  # outages seen (for metrics)

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    @property
    def expired(self) -> bool:
        """The current outage has lasted ``outage_timeout_s``."""
        return self.is_open and self._clock() - self.opened_at >= self.outage_timeout_s

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
        self._changed = None

    async def acquire(self) -> bool:
        """Wait until a request may be sent; True when this request is the probe."""
        waited = False
        while self.opened_at is not None:
            now = self._clock()
            if now - self.opened_at >= self.outage_timeout_s:
                if waited:  # this request waited out the whole budget
                    raise ServerUnreachable(now - self.opened_at)
                return True  # past the budget: each new request tries once, fails at once
            if not self._probing and now >= self._next_probe:
                self._probing = True
                return True
            waited = True
            if self._changed is None:
                self._changed = asyncio.Event()
            deadline = self.opened_at + self.outage_timeout_s
            wait = min(deadline, self._next_probe if not self._probing else deadline) - now
            with contextlib.suppress(asyncio.TimeoutError):  # not builtin before Python 3.11
                await asyncio.wait_for(self._changed.wait(), timeout=max(wait, 0.005))
        return False

    def reached(self, probe: bool) -> None:
        """The server answered (any status, or a timeout after connecting): it is up.

        While the breaker is open only a probe closes it. A non-probe request was sent before
        the outage began (none is sent while it is open), so its late answer, or the dropped
        connection of a server going down, says nothing about the server now; letting it close
        the breaker released every waiter into refused connects (CI: 3 outages, 143 refused
        connects for one 3 s outage).
        """
        if probe:
            self._probing = False
        elif self.opened_at is not None:
            return
        if self.opened_at is not None:
            log.warning("judge server reachable again after %.1f s", self._clock() - self.opened_at)
            self.opened_at = None
            self._interval = self.first_interval_s
        self._notify()

    def unreachable(self, probe: bool) -> None:
        """A connection was refused: open the breaker (or keep it open) and schedule a probe."""
        now = self._clock()
        if probe:
            self._probing = False
        if self.opened_at is None:
            self.opened_at = now
            self.outages += 1
            self._interval = self.first_interval_s
            self._next_probe = now + self._interval
            log.warning(
                "judge server unreachable; requests wait for it (up to %.0f s, "
                "judge.outage_timeout_s)",
                self.outage_timeout_s,
            )
        elif probe:
            self._interval = min(2 * self._interval, _MAX_PROBE_INTERVAL_S)
            self._next_probe = now + self._interval * (0.75 + random.random() / 2)
        self._notify()

    def release(self, probe: bool) -> None:
        """The probe ended without an outcome (cancelled): let another request probe."""
        if probe and self._probing:
            self._probing = False
            self._notify()
