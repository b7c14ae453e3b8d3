"""The daemon's counters and the Prometheus text format (pure: times are arguments).

Process counters (attempts by outcome, send latency, what this process planned and
sent) reset when the daemon restarts, as Prometheus counters do; ledger figures
(messages by campaign and state, queue depth) are read from the database at
scrape time and passed to ``render``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_SECONDS = 60.0


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1


@dataclass(frozen=True)
class HealthLine:
    """What happened since the last health line, and where things stand."""

    planned: int
    sent: int
    failed: int
    uncertain: int
    skipped: int
    retried: int
    rate_per_minute: float


@dataclass
class Metrics:
    planned: Counter[str] = field(default_factory=Counter)
    """Rows created by planning in this process, by campaign."""
    results: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(campaign, result) for every message this process finished: sent, retry, failed, uncertain, skipped:<reason>."""
    attempts: Counter[str] = field(default_factory=Counter)
    """SMTP attempts by outcome (sent, transient, permanent, ambiguous, render_error)."""
    latency: Histogram = field(default_factory=Histogram)
    _sends: deque[float] = field(default_factory=deque)
    _last_health: Counter[str] = field(default_factory=Counter)

    last_planned: dict[str, float] = field(default_factory=dict)
    """When each campaign's last planning pass in this process finished (the pass's time, Unix seconds)."""
    left_uncertain: int = 0
    """Rows a shutdown made ``uncertain``, its grace period over with their sends under way (``since_start``)."""

    def observe_planned(self, campaign: str, created: int, *, at: float | None = None) -> None:
        """A planning pass of ``campaign`` created ``created`` rows; ``at``: the time it planned for (Unix seconds)."""
        self.planned[campaign] += created
        if at is not None:
            self.last_planned[campaign] = at

    def observe_result(self, campaign: str, result: str, outcome: str | None, seconds: float | None, at: float) -> None:
        """One finished message; ``outcome``/``seconds`` when an SMTP attempt was made, ``at`` on a monotonic clock."""
        self.results[(campaign, result)] += 1
        if outcome is not None:
            self.attempts[outcome] += 1
        if seconds is not None:
            self.latency.observe(seconds)
            self._sends.append(at)
            # forget what left the window here too, not only when the rate is read: with the health line off
            # and nobody scraping /metrics, every send ever made would stay in memory
            while self._sends[0] < at - RATE_WINDOW_SECONDS:
                self._sends.popleft()

    def rate_per_second(self, now: float, window: float = RATE_WINDOW_SECONDS) -> float:
        """Attempts per second over the last ``window`` seconds."""
        while self._sends and self._sends[0] < now - window:
            self._sends.popleft()
        return len(self._sends) / window

    def _totals(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        totals["planned"] = sum(self.planned.values())
        for (_campaign, result), n in self.results.items():
            totals[result.split(":")[0]] += n
        totals["uncertain"] += self.left_uncertain
        return totals

    def since_start(self) -> dict[str, int]:
        """What this process did since it started (the daemon's last line says it, as `run --once`'s summary does)."""
        return _counts(self._totals())

    def health(self, now: float) -> HealthLine:
        """Counts since the previous call, and the current send rate."""
        totals = self._totals()
        since = totals - self._last_health
        self._last_health = totals
        return HealthLine(**_counts(since), rate_per_minute=round(self.rate_per_second(now) * 60, 1))

    def render(
        self,
        *,
        ledger: Mapping[tuple[str, str], int] | None,
        queue_depth: int | None,
        rate_limit_per_second: float,
        rate_burst: int,
        paused: bool,
        now: float,
        relay_pace_per_second: float | None = None,
        relay_slowed: bool = False,
    ) -> str:
        """The Prometheus text exposition (format 0.0.4). ``ledger`` and ``queue_depth`` are None when the database
        could not be read: their families have no samples, ``kembali_database_up`` is 0, the rest is as always.
        ``relay_pace_per_second``: the global rate as the relay's throttling left it (``core.pace``; None: the
        configured one), ``relay_slowed`` whether that throttling holds it below the configured rate."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        family("kembali_database_up", "gauge", "1 when the ledger could be read for this scrape.",
               [("", int(ledger is not None))])
        family("kembali_messages", "gauge", "Ledger rows by campaign and state.",
               ((_labels(campaign=c, state=s), n) for (c, s), n in sorted((ledger or {}).items())))
        family("kembali_queue_depth", "gauge",
               "Rows due to be sent now, claimed ones and those this worker sent back to wait for their domain's rate "
               "included.",
               [("", queue_depth)] if queue_depth is not None else [])
        family("kembali_planned_total", "counter", "Rows created by planning in this process.",
               ((_labels(campaign=c), n) for c, n in sorted(self.planned.items())))
        family("kembali_last_planned_timestamp_seconds", "gauge",
               "When each campaign's last planning pass in this process was done (Unix time): alert on its age.",
               ((_labels(campaign=c), t) for c, t in sorted(self.last_planned.items())))
        family("kembali_results_total", "counter", "Messages this process finished, by campaign and result.",
               ((_labels(campaign=c, result=r), n) for (c, r), n in sorted(self.results.items())))
        family("kembali_attempts_total", "counter", "SMTP attempts by outcome.",
               ((_labels(outcome=o), n) for o, n in sorted(self.attempts.items())))
        h = self.latency
        samples = [(_labels(le=_number(b)), c) for b, c in zip(h.buckets, h.counts, strict=True)]
        samples.append((_labels(le="+Inf"), h.count))
        out.append("# HELP kembali_send_seconds Time of one SMTP attempt.")
        out.append("# TYPE kembali_send_seconds histogram")
        out.extend(f"kembali_send_seconds_bucket{labels} {value}" for labels, value in samples)
        out.append(f"kembali_send_seconds_sum {_number(h.total)}")
        out.append(f"kembali_send_seconds_count {h.count}")
        family("kembali_send_rate_per_second", "gauge", "Attempts per second over the last minute.",
               [("", self.rate_per_second(now))])
        family("kembali_rate_limit_per_second", "gauge", "The configured global sending rate.",
               [("", rate_limit_per_second)])
        family("kembali_rate_limit_burst", "gauge", "The configured burst.", [("", rate_burst)])
        family("kembali_relay_pace_per_second", "gauge",
               "The global sending rate now: the configured one, or lower while the SMTP relay's throttling slows it.",
               [("", rate_limit_per_second if relay_pace_per_second is None else relay_pace_per_second)])
        family("kembali_relay_pace_slowed", "gauge",
               "1 while the SMTP relay's throttling holds the global rate below the configured one.",
               [("", int(relay_slowed))])
        family("kembali_dispatcher_paused", "gauge", "1 when the dispatcher is paused.", [("", int(paused))])
        return "\n".join(out) + "\n"


def _counts(totals: Counter[str]) -> dict[str, int]:
    """The health line's counts (and the daemon's last line's) from ``Metrics._totals``."""
    return {"planned": totals["planned"], "sent": totals["sent"], "failed": totals["failed"],
            "uncertain": totals["uncertain"], "skipped": totals["skipped"], "retried": totals["retry"]}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
