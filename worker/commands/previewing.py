"""`kembali preview`: the real planning, re-check and rendering, with no sends and no writes."""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

from worker.app import Deps, link_keys
from worker.commands.progress import Progress
from worker.config import Settings
from worker.errors import ConfigError
from worker.pipeline import Composed, RenderFailed, Skipped
from worker.pipeline import preview as run_preview

EXIT_OK, EXIT_RENDER_ERRORS = 0, 1


def _local(at: datetime, zone: str) -> str:
    return at.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %Z")


def preview(settings: Settings, args: argparse.Namespace) -> int:
    deps = Deps.build(settings)
    at: datetime = args.at or deps.clock.now()
    try:
        keys = link_keys(settings)
    except ConfigError:  # a preview's links are never clicked: a throwaway key will do
        print(f"note: {settings.unsubscribe.secret_env} is not set; preview links use a throwaway key",
              file=sys.stderr)
        keys = [secrets.token_bytes(32)]
    composer = deps.composer(keys)
    skipped: Counter[str] = Counter()
    would_send = 0
    render_errors: list[RenderFailed] = []
    progress = Progress("previewing")
    out = sys.stdout
    try:
        if not args.json:
            out.write(f"Preview as of {_local(at, settings.shop.time_zone)} (nothing is sent or written)\n\n")
            out.write(f"{'customer':<14} {'campaign':<14} {'when (their time)':<22} subject\n")
        for seen, item in enumerate(run_preview(
            deps.store, settings, composer, at,
            campaigns=args.campaign, customer_external_id=args.customer, limit=args.limit,
        ), start=1):
            progress.update(seen, "messages considered")
            message = item.message
            if isinstance(item, Composed):
                would_send += 1
                when = _local(max(at, message.due_at), item.customer.time_zone)
                row = {"action": "send", "customer": item.customer.external_id, "campaign": message.campaign,
                       "step": message.step, "when": when, "subject": item.rendered.subject,
                       "dedupe_key": message.dedupe_key, "template_version": item.rendered.template_version}
                if args.json:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                else:
                    label = f"{message.campaign}/{message.step}"
                    out.write(f"{item.customer.external_id:<14} {label:<14} {when:<22} {item.rendered.subject}\n")
            elif isinstance(item, Skipped):
                skipped[item.reason.value] += 1
                if args.json:
                    out.write(json.dumps({"action": "skip", "dedupe_key": message.dedupe_key,
                                          "reason": item.reason.value}) + "\n")
            else:
                render_errors.append(item)
                skipped["render_error"] += 1
                if args.json:
                    out.write(json.dumps({"action": "render_error", "dedupe_key": message.dedupe_key,
                                          "error": str(item.error)}, ensure_ascii=False) + "\n")
    finally:
        progress.done()
        deps.close()
    if not args.json:
        out.write(f"\n{would_send} would be sent")
        if skipped:
            out.write("; skipped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())))
        out.write("\n")
        for failure in render_errors:
            out.write(f"render error: {failure.message.dedupe_key}: {failure.error}\n")
    return EXIT_RENDER_ERRORS if render_errors else EXIT_OK
