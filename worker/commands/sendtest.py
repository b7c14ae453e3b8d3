"""`kembali send-test`: one real rendered message to the operator, marked as a test; the ledger is untouched.

The message is built the way the sender builds it (context, renderer, MIME
writer) for a real customer (``--customer``) or a sample one, but goes to
``--to``, with "[TEST] " before the subject, an ``X-Kembali-Test`` header and a
fresh Message-ID. Its unsubscribe link is signed with a sample key, so clicking
it in the test mail cannot unsubscribe the customer it was rendered for.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import uuid

from worker import contexts, stopping
from worker.app import Deps
from worker.checks import SAMPLE_LINK_KEY, campaigns_to_check
from worker.commands import arguments
from worker.config import tls_port_hint
from worker.core import samples
from worker.core.render import build_context, build_message, sanitize_header_text
from worker.core.retry import connection_failure
from worker.domain import ClaimedMessage, Locale, Outcome, SendResult, SendTimeFacts
from worker.errors import TemplateError
from worker.log import printable
from worker.pipeline import Composer, load_batch_facts, load_catalogue

EXIT_OK, EXIT_NOT_SENT, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
"""What it sent goes to stdout; why it sent nothing (or may have), to stderr, named "kembali send-test:"."""
TEST_PREFIX = "[TEST] "


def send_test(deps: Deps, args: argparse.Namespace) -> int:
    settings = deps.settings
    if args.campaign not in campaigns_to_check(settings, deps.templates):
        known = ", ".join(campaigns_to_check(settings, deps.templates))
        print(f"kembali send-test: no campaign {args.campaign!r} (campaigns: {known})", file=sys.stderr)
        return EXIT_USAGE
    store = deps.store
    payload = dict(samples.SAMPLE_PAYLOAD)
    if args.customer:
        found = store.customer_by_external_id(args.customer)
        if found is None:
            meant = arguments.customer_meant(store.engine, args.customer)
            print(f"kembali send-test: no customer with id {printable(args.customer)!r}{meant}", file=sys.stderr)
            return EXIT_USAGE
        customer, order_id, order_external_id = found
        if order_id is not None:  # the customer's own order, for win-back's "you bought" and feedback's rating
            payload.update(first_order_id=str(order_id), first_order=str(order_external_id), order_id=str(order_id),
                           order=str(order_external_id))  # fmt: skip
    else:
        customer = samples.samples(Locale(settings.shop.default_locale))[0].customer
    now = deps.clock.now()
    payload["birthday"] = contexts.birthday_to_show(settings, customer, now)
    campaign, step = contexts.sent_as(settings, args.campaign)  # a win-back step's folder: with that step's coupon
    payload["template"] = args.campaign
    message = ClaimedMessage(
        id=0, dedupe_key=f"test:{args.campaign}:{customer.external_id}", campaign=campaign, step=step,
        customer_id=customer.id, email=args.to, message_id=f"<test-{uuid.uuid4().hex}@{settings.shop.domain}>",
        attempts=0, due_at=now, expires_at=now, payload=payload,
    )  # fmt: skip
    composer = Composer(settings, deps.templates, SAMPLE_LINK_KEY)
    facts = load_batch_facts(store, [message], load_catalogue(store, now))
    found_facts = facts.customers[customer.id]
    if found_facts.customer is None:  # a sample customer: not in the database
        facts.customers[customer.id] = SendTimeFacts(
            customer=customer, suppressed=False, order_count=samples.SAMPLE_ORDER_COUNT, last_order_at=now
        )
    elif found_facts.order_count < samples.SAMPLE_ORDER_COUNT:
        # the loyalty email goes to a customer who reached its milestone (the sample's): read as it would then
        facts.customers[customer.id] = dataclasses.replace(found_facts, order_count=samples.SAMPLE_ORDER_COUNT)
    unsubscribe = composer.unsubscribe_url(customer)
    context = build_context(campaign, customer, shop=composer.shop, unsubscribe_url=unsubscribe,
                            extra=composer.extra_context(message, facts))  # fmt: skip
    try:
        rendered = deps.templates.render(args.campaign, customer.locale, context)
    except TemplateError as exc:
        print(f"kembali send-test: render error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_NOT_SENT
    rendered = dataclasses.replace(rendered, subject=TEST_PREFIX + rendered.subject)
    data = build_message(
        rendered, to_name=customer.name, to_address=args.to, shop=composer.shop, message_id=message.message_id,
        date=now, list_unsubscribe_https=unsubscribe, list_unsubscribe_mailto=settings.unsubscribe.mailto,
        extra_headers=(("X-Kembali-Campaign", args.campaign), ("X-Kembali-Test", "yes")),
    )  # fmt: skip
    result = stopping.run_terminable(_send(deps, settings.shop.from_address, args.to, data))
    who = f"customer {customer.external_id}" if args.customer else "a sample customer"
    if result.outcome is Outcome.SENT:
        # the subject carries customer data, a reply the server's text: escape what is not printable (a terminal escape)
        print(f"sent a test {args.campaign} email ({printable(who)}, {customer.locale}) to {args.to}: "
              f"{printable(sanitize_header_text(rendered.subject))}")  # as its Subject header went out
        reply = result.reply if result.reply.startswith(str(result.code)) else f"{result.code} {result.reply}"
        print(f"server reply: {printable(reply)}")
        return EXIT_OK
    failure = connection_failure(result)
    if failure is not None:  # before RCPT TO: the server or the setup, not this message (exit 3, as documented)
        hint = tls_port_hint(settings.smtp)  # 465 without "tls" times out like a hung server: as `run --once` says
        refused_for_now = result.code is not None and 400 <= result.code < 500  # a 454 at AUTH: the server's, for now
        fix = {"setup": f"; check {result.setup}",
               "auth": "; the server refuses logins for now (not a wrong password): try again later"
               if refused_for_now else f"; check smtp.username and the password in ${settings.smtp.password_env}"}.get(
                   failure, f"; {hint}" if hint else "")  # fmt: skip
        print(f"kembali send-test: not sent: the SMTP server {settings.smtp.host}:{settings.smtp.port} could not be "
              f"used: {printable(result.reply or result.error_type)}{fix}", file=sys.stderr)  # fmt: skip
        return EXIT_UNAVAILABLE
    if result.outcome is Outcome.AMBIGUOUS:  # handed over, then no reply: "not sent" would invite a second copy
        print(f"kembali send-test: may have been sent: the server took the message but did not confirm it "
              f"({printable(result.reply or result.error_type)}): look in the inbox of {args.to} before "
              "sending another", file=sys.stderr)  # fmt: skip
        return EXIT_NOT_SENT
    print(f"kembali send-test: not sent ({result.outcome.value}): {printable(result.reply or result.error_type)}",
          file=sys.stderr)
    return EXIT_NOT_SENT


async def _send(deps: Deps, sender: str, to: str, data: bytes) -> SendResult:
    async with deps.transport() as transport:
        return await transport.send(sender, to, data)
