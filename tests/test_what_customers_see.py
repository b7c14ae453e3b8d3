"""What a customer reads: whole emails sent by a real cycle to a real aiosmtpd server on 127.0.0.1:0, parsed as
a mail client parses them, for shop data as shops have it (abbreviated names, products without a picture or a
link)."""

from __future__ import annotations

import asyncio
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from tests.shop import LINK_KEY, NOW, customer, make_shop, one_time_order, settings_for
from tests.smtp_server import RecordingServer
from worker.adapters.store import Store
from worker.adapters.templates import JinjaTemplates
from worker.app import Deps
from worker.commands.running import cycle
from worker.config import Settings
from worker.domain import Locale
from worker.testing import FakeClock


@pytest.fixture(autouse=True)
def link_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEMBALI_LINK_SECRET", LINK_KEY)


def _send(settings: Settings, store: Store) -> None:
    deps = Deps(settings=settings, store=store, templates=JinjaTemplates(settings.resolve(settings.templates.dir)),
                clock=FakeClock(NOW))
    asyncio.run(cycle(deps))


def _received(server: RecordingServer) -> dict[str, EmailMessage]:
    out: dict[str, EmailMessage] = {}
    for m in server.messages:
        parsed = BytesParser(policy=policy.default).parsebytes(m.data)
        assert isinstance(parsed, EmailMessage)
        out[m.rcpt_tos[0]] = parsed
    return out


def _parts(message: EmailMessage) -> tuple[str, str]:
    text, html = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None and html is not None
    return str(text.get_content()), str(html.get_content())


@pytest.mark.parametrize(
    ("name", "locale", "greeting", "subject_start"),
    [
        ("M. Rizky Pratama", Locale.ID, "Halo Kak Rizky,", "Kak Rizky, "),  # M. is Muhammad: not "Halo Kak M.,"
        ("MOH. ARIF HIDAYAT", Locale.ID, "Halo Kak Arif,", "Kak Arif, "),
        ("Muh Yusuf", Locale.ID, "Halo Kak Yusuf,", "Kak Yusuf, "),
        ("A. Yani", Locale.EN, "Hi Yani,", "Yani, "),
        ("KH. Ahmad Dahlan", Locale.ID, "Halo Kak Ahmad,", "Kak Ahmad, "),
        ("Raden Mas Suryo", Locale.ID, "Halo Kak Suryo,", "Kak Suryo, "),
        ("Teuku Umar", Locale.EN, "Hi Umar,", "Umar, "),
        ("siti.rahayu@gmail.com", Locale.ID, "Halo Kakak,", "Kakak, "),  # the address typed as the name
        ("R.", Locale.EN, "Hi there,", "Still "),  # an initial alone is no name to greet by
    ],
)
def test_a_customer_is_greeted_by_their_name_not_an_initial_a_title_or_their_address(
    sqlite_url: str, smtp_server: RecordingServer, name: str, locale: Locale, greeting: str, subject_start: str
) -> None:
    # Given a quiet one-time buyer whose name starts with an abbreviation or a title, or is their email address
    store = make_shop(sqlite_url, [customer("C1", name=name, locale=locale)], [one_time_order("O1", "C1")])
    # When a cycle sends them a win-back email
    _send(settings_for(sqlite_url, smtp={"port": smtp_server.port}), store)
    # Then the subject, the text part and the HTML part greet them by their name (or the fallback)
    message = _received(smtp_server)["c1@example.com"]
    text, html = _parts(message)
    assert str(message["Subject"]).startswith(subject_start), message["Subject"]
    assert greeting in text.splitlines(), text
    assert f">{greeting}</p>" in html
