"""`kembali run`: one cycle (maintenance, plan, dispatch), once or on an interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections import Counter
from dataclasses import dataclass

from worker import log
from worker.app import Deps
from worker.asyncstore import AsyncStore
from worker.config import Settings
from worker.pipeline import PlanReport, plan
from worker.sending import DispatchReport

EXIT_OK, EXIT_ATTENTION = 0, 1

CAMPAIGN_LABELS = {"winback": "win-back"}


@dataclass
class CycleReport:
    planned: PlanReport
    dispatched: DispatchReport
    requeued: int = 0
    uncertain: int = 0


async def cycle(deps: Deps, *, async_store: AsyncStore | None = None) -> CycleReport:
    """Release lapsed leases, plan every enabled campaign, send everything due."""
    own_store = async_store is None
    astore = async_store or AsyncStore(deps.store)
    try:
        now = deps.clock.now()
        requeued, uncertain = await astore.call(deps.store.release_expired_leases, now)
        if requeued or uncertain:
            log.event("leases_released", logging.WARNING, requeued=requeued, uncertain=uncertain)
        planned = await astore.call(plan, deps.store, deps.settings, now)
        for campaign, created in planned.created.items():
            log.event("campaign_planned", campaign=campaign, created=created, considered=planned.considered[campaign])
        transport = deps.transport()
        try:
            dispatcher = deps.dispatcher(astore, transport)
            dispatched = await dispatcher.run_once()
        finally:
            await transport.close()
        return CycleReport(planned, dispatched, requeued, uncertain)
    finally:
        if own_store:
            astore.close()


def summary(report: CycleReport) -> list[str]:
    lines = []
    for campaign, created in report.planned.created.items():
        lines.append(f"planned {created} new {CAMPAIGN_LABELS.get(campaign, campaign)} emails")
    by_campaign: dict[str, Counter[str]] = {}
    for (campaign, what), n in report.dispatched.by_campaign.items():
        by_campaign.setdefault(campaign, Counter())[what] += n
    for campaign, counts in sorted(by_campaign.items()):
        label = CAMPAIGN_LABELS.get(campaign, campaign)
        parts = [f"sent {counts.pop('sent', 0)} {label} emails"]
        parts += [f"{n} {what}" for what, n in sorted(counts.items())]
        lines.append(", ".join(parts))
    if not by_campaign:
        lines.append("nothing was due to send")
    if report.uncertain:
        lines.append(f"{report.uncertain} messages became uncertain (a worker died while sending): "
                     "see `kembali ledger`")
    return lines


def _exit_code(report: CycleReport) -> int:
    bad = sum(n for what, n in report.dispatched.outcomes.items() if what.startswith("failed"))
    return EXIT_ATTENTION if bad else EXIT_OK


def once(settings: Settings) -> int:
    deps = Deps.build(settings)
    try:
        report = asyncio.run(cycle(deps))
    finally:
        deps.close()
    for line in summary(report):
        print(line)
    return _exit_code(report)


def forever(settings: Settings, *, interval_seconds: float) -> int:
    deps = Deps.build(settings)
    try:
        asyncio.run(_forever(deps, interval_seconds))
    finally:
        deps.close()
    return EXIT_OK


async def _forever(deps: Deps, interval_seconds: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    astore = AsyncStore(deps.store)
    log.event("daemon_started", interval_seconds=interval_seconds)
    try:
        while not stop.is_set():
            report = await cycle(deps, async_store=astore)
            for line in summary(report):
                log.event("cycle_summary", text=line)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
    finally:
        astore.close()
        log.event("daemon_stopped")
