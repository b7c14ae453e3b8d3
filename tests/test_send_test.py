"""`kembali send-test`: one real message to the operator, marked as a test, and the ledger untouched."""

from __future__ import annotations

import dataclasses
import re
import socket
from datetime import UTC, date, datetime, timedelta
from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.shop import PRODUCTS, customer, one_time_order
from tests.shop_fixtures import Site, load_shop, make_site
from tests.smtp_server import Behaviour, RecordingServer
from worker.adapters.store import M
from worker.demo import ShopData, generate_shop
from worker.domain import Locale

NOW = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def _ledger_rows(db: Path) -> int:
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        n = int(conn.execute(sa.select(sa.func.count()).select_from(M)).scalar_one())
    engine.dispose()
    return n


def test_send_test_for_a_real_customer(tmp_path: Path, smtp_server: RecordingServer) -> None:
    # Given a shop and a customer who bought a product
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port)
    shop = generate_shop(seed=11, customers=40, now=NOW - timedelta(days=1))
    load_shop(site.settings, shop, NOW)
    customer = shop.customers[0]

    # When the operator sends themselves a test of the win-back email for that customer
    done = site.cli("send-test", "--campaign", "winback", "--customer", customer.external_id,
                    "--to", "operator@shop.example")  # fmt: skip

    # Then exactly one message reached the server, addressed to the operator, marked as a test
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sent a test winback email" in done.stdout
    reply = next(line for line in done.stdout.splitlines() if line.startswith("server reply: "))
    assert reply.startswith("server reply: 250 ") and not reply.startswith("server reply: 250 250")
    (received,) = smtp_server.messages
    assert received.rcpt_tos == ("operator@shop.example",)
    parsed = BytesParser(policy=policy.default).parsebytes(received.data)
    assert str(parsed["Subject"]).startswith("[TEST] ")
    assert parsed["X-Kembali-Test"] == "yes"
    assert "operator@shop.example" in str(parsed["To"])
    text = parsed.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    first = customer.name.split()[0]
    assert first in text or first in str(parsed["Subject"])
    # And the ledger is untouched
    assert _ledger_rows(site.db_path) == 0


def test_send_test_with_a_sample_customer_and_a_refusing_server(tmp_path: Path, smtp_server: RecordingServer) -> None:
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port)
    done = site.cli("send-test", "--campaign", "winback", "--to", "me@shop.example")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(smtp_server.messages) == 1

    smtp_server.on("full@shop.example", Behaviour(rcpt_reply="550 5.1.1 No such user"))
    done = site.cli("send-test", "--campaign", "winback", "--to", "full@shop.example")
    assert done.returncode == 1
    # the refusal is a diagnostic, on stderr with the command's name, as exit 2 and 3's are: stdout says only what
    # was sent (a script reading it got "kembali send-test: not sent…" as if it were the result)
    assert "kembali send-test: not sent (permanent): 550 5.1.1 No such user" in done.stderr
    assert done.stdout == ""

    done = site.cli("send-test", "--campaign", "nosuch", "--to", "me@shop.example")
    # a mistyped --campaign is the command line's mistake, named as --customer's is: not a "configuration error"
    # that sent the operator looking through config.toml
    assert done.returncode == 2 and "kembali send-test: no campaign 'nosuch'" in done.stderr, done.stderr
    assert "configuration error" not in done.stderr
    assert _ledger_rows(site.db_path) == 0


def test_a_server_that_cannot_be_reached_is_exit_3_naming_it(tmp_path: Path) -> None:
    # the CLI's docstring says 3 when the SMTP server could not be used; a refused connection was exit 1
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    site = make_site(tmp_path / "site", smtp_port=port)
    done = site.cli("send-test", "--campaign", "winback", "--to", "me@shop.example")
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"kembali send-test: not sent: the SMTP server 127.0.0.1:{port} could not be used: " in done.stderr
    assert "Connect call failed" in done.stderr and "Traceback" not in done.stderr


def test_an_unknown_customer_is_named_on_stderr(tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
    for argv in (["send-test", "--campaign", "winback", "--customer", "NOPE", "--to", "me@shop.example"],
                 ["preview", "--customer", "NOPE"]):  # fmt: skip
        done = site.cli(*argv)
        assert done.returncode == 2 and "no customer with id 'NOPE'" in done.stderr, (argv, done.stdout, done.stderr)


def test_a_customer_id_in_the_wrong_case_is_answered_with_the_id_meant(tmp_path: Path) -> None:
    # Given a shop whose customers' ids are C-0001 and C-0002
    site = make_site(tmp_path / "site")
    load_shop(site.settings, ShopData([customer("C-0001"), customer("C-0002")], PRODUCTS,
                                      [one_time_order("O-1", "C-0001")]), NOW)  # fmt: skip
    # When an operator types c-0001 (it said only "no customer with id 'c-0001'"), or an id of no customer
    for argv in (["send-test", "--campaign", "winback", "--to", "me@shop.example"], ["preview"]):
        done = site.cli(*argv, "--customer", "c-0001")
        # Then the id that differs only in case is suggested
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        assert "no customer with id 'c-0001'; did you mean 'C-0001'?" in done.stderr, (argv, done.stderr)
        done = site.cli(*argv, "--customer", "C-0003")
        assert done.returncode == 2 and "no customer with id 'C-0003'\n" in done.stderr, (argv, done.stderr)


def test_send_test_of_a_loyalty_or_feedback_email_reads_as_the_real_one_would(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port)
    shop = generate_shop(seed=11, customers=40, now=NOW - timedelta(days=1))
    load_shop(site.settings, shop, NOW)
    customer = shop.customers[0]
    first_order = next(o.external_id for o in shop.orders if o.customer_external_id == customer.external_id)
    for campaign in ("loyalty", "feedback"):
        done = site.cli("send-test", "--campaign", campaign, "--customer", customer.external_id,
                        "--to", "operator@shop.example")  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    loyalty, feedback = (BytesParser(policy=policy.default).parsebytes(m.data) for m in smtp_server.messages)
    assert " 0 kali" not in str(loyalty["Subject"]) and " 0 orders" not in str(loyalty["Subject"])
    assert " 5 kali" in str(loyalty["Subject"]) or " 5 orders" in str(loyalty["Subject"]), loyalty["Subject"]
    text = feedback.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert first_order in text and "INV-SAMPLE" not in text


def _a_customer_named(tmp_path: Path, smtp_server: RecordingServer, name: str) -> tuple[Site, str]:
    """A shop whose customers are all named ``name``, and the id of one of them."""
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port)
    shop = generate_shop(seed=11, customers=40, now=NOW - timedelta(days=1))
    load_shop(site.settings, shop, NOW)
    engine = sa.create_engine(site.settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE customer SET name = :n"), {"n": name})
    engine.dispose()
    return site, shop.customers[0].external_id


def test_customer_data_and_server_replies_reach_the_terminal_escaped(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a customer whose name carries a terminal escape, an 8-bit CSI and a right-to-left override
    site, customer = _a_customer_named(tmp_path, smtp_server, "\x1b]0;owned\x07\x9b31m\u202eBudi Santoso")
    # When the operator sends a test for that customer, once accepted and once refused with an escape in the reply
    smtp_server.on("refused@shop.example", Behaviour(rcpt_reply="550 5.1.1 \x1b[2J\rgone"))
    for to, code in (("operator@shop.example", 0), ("refused@shop.example", 1)):
        done = site.cli("send-test", "--campaign", "winback", "--customer", customer, "--to", to)
        # Then what it prints holds no control character: the reply shows them escaped
        printed = done.stdout + done.stderr
        assert done.returncode == code, printed
        assert not any(ch in printed for ch in "\x1b\x07\x9b\r\u202e"), repr(printed)
        # (the subject greets the name as the email has it: cleaned of its controls, the first word left)
        assert ("Kak ]0;owned, masih suka" in printed) == (code == 0), printed
        assert ("550 5.1.1 \\u001b[2J\\rgone" in printed) == (code == 1), printed


def test_the_subject_it_says_it_sent_is_the_subject_header_that_went_out(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a customer whose first name starts an encoded-word and runs long
    site, customer = _a_customer_named(tmp_path, smtp_server, "=?utf-8?q?Bcc?=" + "a" * 180)
    # When the operator sends a test for that customer
    done = site.cli("send-test", "--campaign", "winback", "--customer", customer, "--to", "operator@shop.example")
    # Then the subject it says it sent is the one the message went out with ("=?" defused, cut to 200 characters)
    assert done.returncode == 0, done.stdout + done.stderr
    (received,) = smtp_server.messages
    subject = BytesParser(policy=policy.default).parsebytes(received.data)["Subject"]
    assert len(subject) <= 200 and "=?" not in subject
    assert done.stdout.splitlines()[0].endswith(f": {subject}"), (done.stdout, subject)


def test_a_test_message_the_server_did_not_confirm_is_not_called_unsent(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given a server that takes the whole message, then never answers the final dot within the timeout
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port)
    site.config.write_text(site.config.read_text().replace("timeout_seconds = 5.0",
                                                           "timeout_seconds = 5.0\nfinal_reply_timeout_seconds = 0.5"))
    smtp_server.on("me@shop.example", Behaviour(delay_at="data", delay_seconds=1.0))

    done = site.cli("send-test", "--campaign", "winback", "--to", "me@shop.example")

    # Then it is not called "not sent" (it may well have arrived: sending another could make two), and says so
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not sent" not in done.stdout + done.stderr
    assert "may have been sent" in done.stderr and "me@shop.example" in done.stderr
    assert "Timed out waiting for server response" in done.stderr
    assert done.stdout == ""


def test_a_template_that_does_not_render_is_named_on_stderr(tmp_path: Path, smtp_server: RecordingServer) -> None:
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port, copy_templates=True)
    for locale in ("id", "en"):
        (site.folder / "templates" / "winback" / locale / "body.txt").write_text("{{ bas_url.x }}\n", encoding="utf-8")

    done = site.cli("send-test", "--campaign", "winback", "--to", "me@shop.example")

    assert done.returncode == 1, done.stdout + done.stderr
    assert "kembali send-test: render error: " in done.stderr and "body.txt" in done.stderr
    assert done.stdout == "" and smtp_server.messages == []


def test_send_test_of_a_win_back_steps_folder_carries_that_steps_coupon(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # the win-back steps of the shipped config.toml: day 45 no coupon, day 75 KEMBALI10, day 120 KEMBALI15
    shipped = ((45, "winback-reminder", ""), (75, "winback", 'coupon_code = "KEMBALI10"\ncoupon_percent = 10'),
               (120, "winback-last", 'coupon_code = "KEMBALI15"\ncoupon_percent = 15'))
    steps = "".join(f'[[campaigns.winback.steps]]\ndays = {days}\ntemplate = "{folder}"\n{coupon}\n'
                    for days, folder, coupon in shipped)
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port, extra_toml=steps)

    # the operator sends themselves the last step's email, as its customers get it
    done = site.cli("send-test", "--campaign", "winback-last", "--to", "me@shop.example")

    assert done.returncode == 0, done.stdout + done.stderr
    (received,) = smtp_server.messages
    parsed = BytesParser(policy=policy.default).parsebytes(received.data)
    text = parsed.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    assert "KEMBALI15" in text and "15%" in text


def test_send_test_of_a_birthday_template_printing_the_birthday(tmp_path: Path, smtp_server: RecordingServer) -> None:
    # Given a birthday template that prints the day being celebrated, as templates/email/README.md shows
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port, copy_templates=True,
                     extra_toml="[campaigns.birthday]\nenabled = true\n")  # fmt: skip
    body = site.folder / "templates" / "birthday" / "id" / "body.txt"
    text = body.read_text(encoding="utf-8")
    assert " Semoga sehat" in text
    body.write_text(text.replace(" Semoga sehat", " ({{ birthday | date }}) Semoga sehat"))
    # When the operator sends themselves a test of it
    done = site.cli("send-test", "--campaign", "birthday", "--to", "me@shop.example")
    # Then it is sent, the day written in Indonesian (it failed: "render error: … Invalid isoformat string: ''")
    assert done.returncode == 0, done.stdout + done.stderr
    (received,) = smtp_server.messages
    parsed = BytesParser(policy=policy.default).parsebytes(received.data)
    sent = parsed.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    months = "Januari|Februari|Maret|April|Mei|Juni|Juli|Agustus|September|Oktober|November|Desember"
    assert re.search(rf"\(\d{{1,2}} ({months}) \d{{4}}\) Semoga sehat", sent), sent


def test_a_server_on_the_implicit_tls_port_without_tls_is_told_what_to_check(tmp_path: Path) -> None:
    # Given smtp.port 465 (SMTPS) with smtp.tls = "starttls": a real server there waits for TLS while kembali waits
    # for its greeting, and the attempt times out like a hung server (here nothing listens: refused)
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 465)) == 0:
            pytest.skip("something listens on 127.0.0.1:465")
    site = make_site(tmp_path / "site", smtp_port=465)
    site.config.write_text(site.config.read_text().replace("pool_size = 2\n", 'pool_size = 2\ntls = "starttls"\n'))

    done = site.cli("send-test", "--campaign", "winback", "--to", "me@shop.example")

    # Then it says what `run --once` and `check` say: 465 is the implicit-TLS port, smtp.tls is usually 'tls'
    assert done.returncode == 3, done.stdout + done.stderr
    assert "kembali send-test: not sent: the SMTP server 127.0.0.1:465 could not be used: " in done.stderr
    assert "smtp.port 465 is the implicit-TLS port (SMTPS), where smtp.tls is usually 'tls', not 'starttls'" in (
        done.stderr
    )


def test_a_login_refused_for_now_is_not_blamed_on_the_password(
    tmp_path: Path, smtp_server: RecordingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a relay whose login service is down for now: it answers every login with a 454
    smtp_server.login = ("shop", "another-password")
    smtp_server.login_refusal = "454 4.7.0 Temporary authentication failure"
    monkeypatch.setenv("KEMBALI_SMTP_PASSWORD", "right-password-hunter2")
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port)
    site.config.write_text(site.config.read_text().replace("pool_size = 2\n", 'pool_size = 2\nusername = "shop"\n')
                           .replace('level = "warning"', 'level = "debug"'))  # (every event: no password in any)

    done = site.cli("send-test", "--campaign", "winback", "--to", "me@shop.example")

    # Then it says the server refuses logins for now, not to check the password
    assert done.returncode == 3, done.stdout + done.stderr
    assert "could not be used: 454 4.7.0 Temporary authentication failure; " in done.stderr
    assert "refuses logins for now" in done.stderr and "not a wrong password" in done.stderr
    assert "check smtp.username" not in done.stderr and "hunter2" not in done.stderr
    assert smtp_server.messages == []


def test_send_test_of_a_birthday_offer_shows_the_day_its_customer_celebrates(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given birthday offers sent on the day (days_before = 0), and C1, whose birthday is 5 March
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port,
                     extra_toml="[campaigns.birthday]\nenabled = true\ndays_before = 0\n")  # fmt: skip
    c1 = customer("C1", name="Siti Rahayu")
    load_shop(site.settings, ShopData([dataclasses.replace(c1, birthday=date(1990, 3, 5))], PRODUCTS, []),
              datetime.now(UTC))  # fmt: skip
    # When the operator sends themselves a test with the sample customer, then one for C1
    for extra in ((), ("--customer", "C1")):
        done = site.cli("send-test", "--campaign", "birthday", "--to", "me@shop.example", *extra)
        assert done.returncode == 0, done.stdout + done.stderr
    sample, own = (BytesParser(policy=policy.default).parsebytes(m.data) for m in smtp_server.messages)
    sample_text, own_text = (m.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
                             for m in (sample, own))  # fmt: skip
    # Then the sample's reads as its customers get it, on the day (it wished early for 28 February of next year)
    assert "Selamat ulang tahun! Semoga sehat" in sample_text and "lebih awal" not in sample_text, sample_text
    assert "28 Februari 2027" not in sample_text
    # and C1's names C1's birthday, not the sample's
    assert "tanggal 5 Maret" in own_text, own_text


def test_send_test_to_an_address_with_a_display_name_sends_to_the_address(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # `--to 'Name <a@b.example>'` (copied from a mail client) was refused ("A display name and angle brackets around
    # the email address are not permitted here") while `kembali suppress add` took the same text as its address
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port)
    done = site.cli("send-test", "--campaign", "winback", "--to", "Sari Operator <Operator@Shop.example>")
    assert done.returncode == 0, done.stdout + done.stderr
    (received,) = smtp_server.messages
    assert received.rcpt_tos == ("Operator@shop.example",)
    sent = next(line for line in done.stdout.splitlines() if line.startswith("sent a test winback email"))
    assert " to Operator@shop.example: " in sent, sent

    # a really bad address is named as given, and nothing is sent
    done = site.cli("send-test", "--campaign", "winback", "--to", "Sari Operator <operator@>")
    assert done.returncode == 2 and "argument --to: invalid email address 'Sari Operator <operator@>'" in done.stderr, (
        done.stderr
    )
    assert len(smtp_server.messages) == 1


def test_send_test_of_a_birthday_offer_for_a_customer_suggests_what_the_real_offer_would(
    tmp_path: Path, smtp_server: RecordingServer
) -> None:
    # Given C1 and C2, who both bought the shop's best seller (Kopi Gayo); C1's birthday offer suggests best sellers
    # C1 does not have, from the category C1 bought from first
    site = make_site(tmp_path / "site", smtp_port=smtp_server.port,
                     extra_toml="[campaigns.birthday]\nenabled = true\n")  # fmt: skip
    c1 = dataclasses.replace(customer("C1", name="Siti Rahayu", locale=Locale.EN), birthday=date(1990, 3, 5))
    orders = [one_time_order("O1", "C1", days_ago=200), one_time_order("O2", "C2", days_ago=200)]
    load_shop(site.settings, ShopData([c1, customer("C2")], PRODUCTS, orders), datetime.now(UTC))
    # When the operator sends themselves a test of C1's birthday offer
    done = site.cli("send-test", "--campaign", "birthday", "--customer", "C1", "--to", "me@shop.example")
    assert done.returncode == 0, done.stdout + done.stderr
    (received,) = smtp_server.messages
    text = BytesParser(policy=policy.default).parsebytes(received.data).get_body(  # type: ignore[union-attr]
        preferencelist=("plain",)).get_content()
    # Then it reads as C1's offer would: the coffee C1 has is not suggested, the other coffee comes first
    suggested = text.split("A few things you might like", 1)[1]
    assert "Kopi Gayo 250g" not in suggested, text
    assert suggested.index("Kopi Toraja 250g") < suggested.index("Kemeja Batik Parang"), suggested
