"""`kembali suppress add|remove|list|import` as an operator types it."""

from __future__ import annotations

import contextlib
import gzip
import io
import subprocess
import sys
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.clikit import migrated_config
from worker.adapters import opstore
from worker.adapters.store import Store
from worker.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return migrated_config(tmp_path)


def run(config: Path, *args: str) -> int:
    return main(["--config", str(config), "suppress", *args])


def imported(config: Path, file: Path, text: str, *args: str) -> int:
    """``text`` written to ``file`` (UTF-8), then `suppress import FILE ARGS`: its exit code."""
    file.write_text(text, encoding="utf-8")
    return run(config, "import", str(file), *args)


def suppress_list(config: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What `suppress list` prints (what was printed before it is left out)."""
    capsys.readouterr()
    assert run(config, "list") == 0
    return capsys.readouterr().out


def reasons(config: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """Each address `suppress list` lists, with its reason."""
    return {r.split(",")[0]: r.split(",")[1] for r in suppress_list(config, capsys).splitlines()[1:]}


def test_add_list_remove(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # addresses are normalised as customer imports store them, and the list holds them in lower case: one mailbox
    assert run(config, "add", "Budi@Example.COM") == 0
    assert run(config, "add", "Budi@example.com") == 0
    # each says the address as the list holds it (it said "Budi@example.com: suppressed", and listed budi@…)
    said = capsys.readouterr().out.splitlines()
    assert said == ["budi@example.com: suppressed", "budi@example.com: already suppressed"]
    assert run(config, "list") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "email,reason,source,created_at" and out[1].startswith("budi@example.com,manual,cli,")
    assert run(config, "remove", "Budi@example.com") == 0
    assert "removed" in capsys.readouterr().out
    assert run(config, "remove", "Budi@example.com") == 0
    assert "was not suppressed" in capsys.readouterr().out


def test_adding_an_address_already_suppressed_for_another_reason_says_the_reason_it_keeps(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an address on the list as the customer's unsubscribe (a request to the mailto address)
    assert run(config, "add", "budi@example.com", "--reason", "unsubscribed") == 0
    capsys.readouterr()
    # When the operator adds it again as a complaint
    assert run(config, "add", "Budi@example.com", "--reason", "complaint") == 0
    # Then it says the entry keeps its reason, not "already suppressed" alone (read as: now a complaint)
    out = capsys.readouterr().out
    assert out.startswith("budi@example.com: already suppressed as 'unsubscribed' (from cli, since "), out
    assert out.rstrip().endswith("UTC): its reason stays; `kembali suppress remove` it first to change it"), out
    assert reasons(config, capsys) == {"budi@example.com": "unsubscribed"}


def test_a_reason_kembali_knows_given_in_another_case_is_stored_as_kembali_writes_it(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an operator who types the reasons capitalised, on add and on import (as an import's reason cells were
    # already taken: 'Complaint' was stored as is, a reason `stats` counted apart and an import did not carry to
    # the customer's new address as their own wish)
    assert run(config, "add", "budi@example.com", "--reason", "Complaint") == 0
    assert imported(config, tmp_path / "list.txt", "siti@example.com\n", "--reason", "Hard_Bounce") == 0
    # When the list is listed, by a reason in yet another case
    capsys.readouterr()
    assert run(config, "list", "--reason", "COMPLAINT") == 0
    # Then each is stored as Kembali writes it, and found
    assert capsys.readouterr().out.splitlines()[1].startswith("budi@example.com,complaint,cli,")
    assert reasons(config, capsys) == {"budi@example.com": "complaint", "siti@example.com": "hard_bounce"}


def test_a_reason_kembali_knows_stored_in_another_case_before_is_listed_by_that_reason(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an entry an earlier kembali stored as typed, 'Complaint' (`suppress add --reason Complaint` wrote it so)
    store = Store.from_url(f"sqlite:///{config.parent / 'k.db'}")
    try:
        store.suppress("budi@example.com", reason="Complaint", source="cli", now=datetime(2026, 1, 1, tzinfo=UTC))
    finally:
        store.close()
    for asked in ("complaint", "Complaint"):
        # When the operator lists the complaints, as typed then or as Kembali writes it now
        capsys.readouterr()
        assert run(config, "list", "--reason", asked) == 0
        # Then the entry is listed (the reason given is read as 'complaint' now: it found nothing, and said that no
        # entry has the reason 'complaint' while naming 'Complaint' among the list's reasons)
        captured = capsys.readouterr()
        assert captured.out.splitlines()[1:] == ["budi@example.com,Complaint,cli,2026-01-01T00:00:00+00:00"], captured
        assert captured.err == "1 suppressed address(es)\n", captured
    # and adding the address as a complaint again says it is suppressed already, not that it is 'Complaint' and to
    # remove it first to make it a complaint
    assert run(config, "add", "budi@example.com", "--reason", "complaint") == 0
    assert capsys.readouterr().out == "budi@example.com: already suppressed\n"


def test_add_refuses_a_bad_address(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "add", "not-an-address") == 2
    assert "invalid email address" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("action", "says"),
    [("add", "give an address"), ("remove", "give an address"),
     ("import", "give a file of addresses (or - for standard input)")],  # it said "give an file"
)
def test_an_action_without_its_target_says_what_to_give(
    config: Path, capsys: pytest.CaptureFixture[str], action: str, says: str
) -> None:
    assert run(config, action) == 2
    assert f"kembali suppress {action}: {says}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "bad_line"),
    [("# bounced\nsiti@example.com\n\nbad address\nagus@example.com\nsiti@example.com\n", 4),
     ("id,email,name\n1,siti@example.com,Siti\n2,bad address,X\n3,agus@example.com,Agus\n", 3)],
    ids=["one a line", "csv"],
)
def test_import_reports_bad_lines_and_imports_the_rest(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, bad_line: int
) -> None:
    file = tmp_path / "list.txt"
    assert imported(config, file, text, "--reason", "hard_bounce") == 1
    captured = capsys.readouterr()
    assert f"line {bad_line}: invalid email address" in captured.err, captured.err  # the file's own line number
    assert "line 2:" not in captured.err
    assert "imported 2 address(es): 2 newly suppressed" in captured.out
    assert run(config, "list", "--reason", "hard_bounce") == 0
    assert capsys.readouterr().out.count("@example.com,hard_bounce,import:list.txt") == 2


def test_a_csv_row_quoted_across_lines_is_named_by_its_first_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # as customer, product and order imports name theirs: the line an editor jumps to is where the row starts
    file = tmp_path / "bounces.csv"
    file.write_text('email,note\n"bad\naddress",x\nsiti@example.com,"bounced\ntwice\n"\n\r\nworse@,y\n',
                    encoding="utf-8")  # fmt: skip
    assert run(config, "import", str(file)) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": invalid")[0] for line in err] == [f"{file}: line 2", f"{file}: line 8"], err


def test_only_cr_and_lf_break_lines_in_a_file_of_addresses(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a NEL, a line separator or a form feed in a comment does not start a line: "list" was an address of its own
    file = tmp_path / "bounces.txt"
    assert imported(config, file, "# bounced\x85 list\u2028of May\x0c\nsiti@example.com\r\nbad address\n") == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"{file}: line 3: invalid email address 'bad address' (An email address "
                                         "must have an @-sign.)"]  # fmt: skip
    assert "imported 1 address(es)" in captured.out


@pytest.mark.parametrize(
    ("text", "said"),
    [("ok@example.com\nbad\rone@example.com\nbroken@\nfine@example.com\n", ["line 2: invalid email address 'bad'",
                                                                        "line 3: invalid email address 'broken@'"]),
     ('email,reason\nok@example.com,"bounced\rtwice"\nbroken@,x\n', ["line 2: reason must be one line",
                                                                  "line 3: invalid email address 'broken@'"]),
     ("ok@example.com\rbroken@\rfine@example.com\r", ["line 2: invalid email address 'broken@'"])],
    ids=["lines of LF, a CR in one", "CSV of LF, a CR in a quoted cell", "an old Mac's lines of CR"],
)
def test_a_carriage_return_alone_ends_a_line_only_in_a_file_whose_lines_it_ends(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, said: list[str]
) -> None:
    # as `kembali import` numbers lines, and an editor or `grep -n` shows them: in a file of LF lines a CR alone is
    # no line break, and every line after it was named one line too far on ("line 4: … 'broken@'" for line 3)
    file = tmp_path / "bounces.txt"
    assert imported(config, file, text) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.removeprefix(f"{file}: ")[: len(want)] for line, want in zip(err, said, strict=True)] == said, err


def test_the_list_opens_safely_in_a_spreadsheet_and_imports_back_as_it_was(
    config: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # an address a spreadsheet would read as a formula (a valid local part)
    formula = "=cmd|'/Ccalc'!A0@example.com"
    assert run(config, "add", formula) == 0
    assert run(config, "add", "--", "-budi@example.com") == 0
    listed = suppress_list(config, capsys)
    rows = listed.splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == ["'-budi@example.com", "'=cmd|'/ccalc'!a0@example.com"]
    # the file imports back into the same addresses
    saved = tmp_path / "list.csv"
    saved.write_text(listed)
    assert run(config, "remove", formula) == 0 and run(config, "remove", "--", "-budi@example.com") == 0
    assert run(config, "import", str(saved)) == 0
    again = suppress_list(config, capsys).splitlines()[1:]
    assert sorted(r.split(",")[0] for r in again) == sorted(r.split(",")[0] for r in rows)


@pytest.mark.parametrize("asked", ["unsubscribe", "bounced"])
def test_a_list_of_a_reason_no_entry_has_names_the_reasons_there_are(
    config: Path, capsys: pytest.CaptureFixture[str], asked: str
) -> None:
    # Given a list with an unsubscribe and a bounce
    assert run(config, "add", "budi@example.com", "--reason", "unsubscribed") == 0
    assert run(config, "add", "siti@example.com", "--reason", "hard_bounce") == 0
    capsys.readouterr()
    # When the operator lists a reason misspelt, or one the list does not have
    assert run(config, "list", "--reason", asked) == 0
    captured = capsys.readouterr()
    # Then the list is empty, and says that no entry has that reason and which reasons it has: "0 suppressed
    # address(es)" alone read as "nobody has unsubscribed"
    assert captured.out == "email,reason,source,created_at\n"
    assert captured.err.splitlines() == [
        "0 suppressed address(es)",
        f"(no entry has the reason {asked!r}; the list's reasons: hard_bounce, unsubscribed)",
    ], captured.err


def _bounced(db_url: str, tmp_path: Path, count: int, database: str = "") -> tuple[Path, list[str]]:
    """A config of ``db_url`` (and the ``[database]`` lines ``database``), and the ``count`` addresses suppressed in
    it as hard bounces, in the order they were added."""
    config = tmp_path / "other.toml"
    config.write_text(f'[database]\nurl = "{db_url}"\n{database}', encoding="utf-8")
    store = Store.from_url(db_url)
    try:
        addresses = [f"user{i:05d}@example.com" for i in range(count)]
        assert opstore.suppress_many(store, addresses, reason="hard_bounce", source="smtp",
                                     now=datetime(2026, 1, 1, tzinfo=UTC)) == len(addresses)  # fmt: skip
    finally:
        store.close()
    return config, addresses


def test_a_long_list_is_written_as_it_is_read_not_held_in_memory_on_each_database(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a list of 20,000 bounced addresses (an import takes 15 million: every row held as a dict took some
    # 500 bytes, 7.5 GB to list them)
    other, addresses = _bounced(db_url, tmp_path, 20_000)
    # When the operator lists it into a file
    out = tmp_path / "list.csv"
    tracemalloc.start()
    try:
        with out.open("w", encoding="utf-8") as file, contextlib.redirect_stdout(file):
            assert run(other, "list") == 0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Then every address is in it, in the order they were added, and its rows were let go as they were written
    rows = out.read_text(encoding="utf-8").splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == addresses
    assert capsys.readouterr().err == "20000 suppressed address(es)\n"
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB"


class _Pager:
    """Standard output read by a pager the operator leaves open a while after its first screen (`suppress list |
    less`): the first write after ``after`` lines waits ``pause`` seconds, as a pipe whose reader stopped does."""

    def __init__(self, after: int, pause: float) -> None:
        self.lines, self.after, self.pause = 0, after, pause
        self.text = io.StringIO()

    def write(self, text: str) -> int:
        self.lines += text.count("\n")
        if self.pause and self.lines > self.after:
            time.sleep(self.pause)
            self.pause = 0
        return self.text.write(text)

    def flush(self) -> None:
        pass


def test_a_list_read_slowly_is_written_whole_on_each_database(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a list of 3,000 bounced addresses, and a database that ends a session idle inside a transaction after
    # half a second (database.idle_in_transaction_timeout_seconds, 60 s as shipped)
    other, addresses = _bounced(db_url, tmp_path, 3_000, "idle_in_transaction_timeout_seconds = 0.5\n")
    # When the operator lists it into a pager and reads its first screen a while before going on
    pager = _Pager(after=10, pause=1.5)
    with contextlib.redirect_stdout(pager):  # type: ignore[type-var]
        code = run(other, "list")
    # Then every address is listed, not the list cut short by the server ending the session the list was read in
    rows = pager.text.getvalue().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == addresses
    assert code == 0
    assert capsys.readouterr().err == "3000 suppressed address(es)\n"


def test_list_with_an_address_shows_only_that_address(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `suppress list x@y.com` ignored the address and listed everyone
    assert run(config, "add", "budi@example.com") == 0
    assert run(config, "add", "siti@example.com", "--reason", "complaint") == 0
    capsys.readouterr()
    assert run(config, "list", "Siti@Example.com") == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("siti@example.com,complaint,cli,")
    assert "1 suppressed address(es)" in captured.err
    assert run(config, "list", "agus@example.com") == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["email,reason,source,created_at"] and "0 suppressed" in captured.err
    assert run(config, "list", "not-an-address") == 2
    assert "kembali suppress list: invalid email address" in capsys.readouterr().err


@pytest.mark.parametrize(("reason", "says"), [
    ("x\ny", r"must be one line of text without control characters, not 'x\ny'"),
    ("bounced\tby hand", r"must be one line of text without control characters, not 'bounced\tby hand'"),
    ("r" * 31, f"must be at most 30 characters, not 31: '{'r' * 31}'"),  # PostgreSQL's column refused it: a traceback
])
def test_a_reason_with_a_line_break_or_too_long_is_refused(
    config: Path, capsys: pytest.CaptureFixture[str], reason: str, says: str
) -> None:
    # a reason with a line break was stored as it was
    with pytest.raises(SystemExit) as stopped:
        run(config, "add", "budi@example.com", "--reason", reason)
    assert stopped.value.code == 2
    assert f"argument --reason: {says}" in capsys.readouterr().err
    assert run(config, "list") == 0
    assert "0 suppressed address(es)" in capsys.readouterr().err


@pytest.mark.parametrize("separator", [";", "\t"], ids=["semicolon", "tab"])
def test_import_of_a_file_separated_by_semicolons_is_refused_as_import_refuses_it(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], separator: str
) -> None:
    # Given a bounce list as Excel in an Indonesian locale saves "CSV" (a decimal comma, so ';' between columns)
    file = tmp_path / "bounces.csv"
    file.write_text(f"Email{separator}Reason\nx1@example.com{separator}bounce\nx2@example.com{separator}bounce\n",
                    encoding="utf-8")  # fmt: skip
    # When it is imported
    code = run(config, "import", str(file))
    # Then it is refused as `kembali import` refuses such a file, naming the separator (it rejected every line as
    # an invalid address), and nothing is imported
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.splitlines() == [
        f"kembali suppress import: {file}: line 1: the columns are separated by {separator!r}: save the file "
        "comma-separated: nothing was imported"
    ]
    assert run(config, "list") == 0
    assert "0 suppressed address(es)" in capsys.readouterr().err


@pytest.mark.parametrize("separator", [";", "\t"], ids=["semicolon", "tab"])
def test_import_of_a_file_separated_by_semicolons_without_a_header_is_refused_as_a_whole(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], separator: str
) -> None:
    # Given a bounce list saved with ';' between its columns and no header line (an export of address and reason)
    file = tmp_path / "bounces.csv"
    file.write_text(f"# bounced in May\nx1@example.com{separator}bounce\nx2@example.com{separator}bounce\n",
                    encoding="utf-8")  # fmt: skip
    # When it is imported
    code = run(config, "import", str(file))
    # Then it is refused once, naming the file, the line and the separator (each line was rejected as an invalid
    # address), and nothing is imported
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.splitlines() == [
        f"kembali suppress import: {file}: line 2: the columns are separated by {separator!r}: save the file "
        "comma-separated, with a first line naming its 'email' column: nothing was imported"
    ]
    assert captured.out == ""
    assert run(config, "list") == 0
    assert "0 suppressed address(es)" in capsys.readouterr().err


def test_a_file_of_one_address_a_line_with_a_semicolon_in_a_comment_or_a_bad_line_is_imported(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given one address a line, a comment with a ';' before them, and a line further down with a stray ';'
    file = tmp_path / "bounces.txt"
    file.write_text("# bounced; May\nsiti@example.com\nagus@example.com;\n", encoding="utf-8")
    # When it is imported, Then the addresses are, and the bad line is named as before
    assert run(config, "import", str(file)) == 1
    captured = capsys.readouterr()
    assert [line.split(": invalid")[0] for line in captured.err.splitlines()] == [f"{file}: line 3"], captured
    assert "imported 1 address(es): 1 newly suppressed, 0 already suppressed, 1 rejected" in captured.out


def test_import_of_a_csv_with_a_field_past_the_field_limit_names_it_and_imports_the_rest(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a bounce export one of whose notes holds a whole bounce message of 200,000 characters
    file = tmp_path / "bounces.csv"
    file.write_text(f'email,note\na@example.com,"{"z" * 200_000}"\nb@example.com,x\n', encoding="utf-8")
    # When it is imported (it stopped with the CSV reader's traceback)
    code = run(config, "import", str(file))
    # Then that row is named as the import of customers names it, and the other is imported
    captured = capsys.readouterr()
    assert code == 1, captured
    assert captured.err.splitlines() == [f"{file}: line 2: unreadable CSV: column 2 'note' holds more than 131072 "
                                         "characters, the most one field may hold"]  # fmt: skip
    assert "imported 1 address(es): 1 newly suppressed" in captured.out
    # and a bad address after it is named after it
    assert imported(config, file, f'email,note\nbad address,x\na@example.com,"{"z" * 200_000}"\nworse@,y\n') == 1
    assert [line.split(": ")[1] for line in capsys.readouterr().err.splitlines()] == ["line 2", "line 3", "line 4"]


@pytest.mark.parametrize(
    "text",
    ["# hard bounces, exported 2026-12-01\nemail,reason\nsiti@example.com,bounce\nagus@example.com,bounce\n",
     "\nemail\nsiti@example.com\nagus@example.com\n",
     "# one column\n\nEmail\nsiti@example.com\nagus@example.com\n"],
    ids=["comment", "blank line", "comment, blank line, one column"],
)
def test_a_csv_after_comment_or_blank_lines_is_read_from_its_header(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    # the header was looked for on line 1 (a comment, or blank): "line 1: a CSV needs an 'email' column", nothing
    # suppressed, and "1 rejected" said of a file whose every address was good
    file = tmp_path / "bounces.csv"
    assert imported(config, file, text, "--reason", "hard_bounce") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "imported 2 address(es): 2 newly suppressed" in captured.out


def test_a_csv_after_a_comment_names_its_bad_lines_by_their_line_in_the_file(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "bounces.csv"
    assert imported(config, file, "# exported\n\nemail,reason\nsiti@example.com,x\nbad address,y\n") == 1
    captured = capsys.readouterr()
    assert f"{file}: line 5: invalid email address 'bad address'" in captured.err
    assert "imported 1 address(es): 1 newly suppressed, 0 already suppressed, 1 rejected" in captured.out


def test_remove_with_a_reason_is_refused_and_removes_nothing(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --reason was accepted and ignored: `remove budi@… --reason hard_bounce` removed an unsubscribe too
    assert run(config, "add", "budi@example.com", "--reason", "unsubscribed") == 0
    capsys.readouterr()
    assert run(config, "remove", "budi@example.com", "--reason", "hard_bounce") == 2
    assert "kembali suppress remove: --reason is for add, import and list" in capsys.readouterr().err
    assert run(config, "list", "budi@example.com") == 0
    assert "budi@example.com,unsubscribed,cli," in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "why"),
    [("x1@example.com,hard bounce\nx2@example.com,hard bounce\n",
      "line 1: a CSV needs an 'email' column (found: x1@example.com, hard bounce): give it a first line naming its "
      "'email' column"),
     ("# cleaned\nEmail Address,First Name\nx1@example.com,Siti\nx2@example.com,Agus\n",
      "line 2: a CSV needs an 'email' column (found: email address, first name): rename 'email address' to "
      "'email'"),
     ("address,reason\nx1@example.com,bounce\n",
      "line 1: a CSV needs an 'email' column (found: address, reason)")],
    ids=["no header", "Mailchimp's header", "another column"],
)
def test_import_of_a_csv_without_an_email_column_is_refused_as_a_whole(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, why: str
) -> None:
    # Given a bounce list of address and reason without a header line, or a CSV whose address column has another
    # name (Mailchimp exports 'Email Address')
    file = tmp_path / "bounces.csv"
    file.write_text(text, encoding="utf-8")
    # When it is imported
    code = run(config, "import", str(file))
    # Then it is refused whole, naming the columns it found and what to change, exit code 2 (it said "imported 0
    # address(es): …, 1 rejected" and exited 1, "the rest imported", of a file none of whose lines was read)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.splitlines() == [f"kembali suppress import: {file}: {why}: nothing was imported"]
    assert captured.out == ""
    assert run(config, "list") == 0
    assert "0 suppressed address(es)" in capsys.readouterr().err


def test_an_address_given_twice_in_other_cases_is_counted_once(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a file naming one mailbox three times in different cases, none of them suppressed before
    file = tmp_path / "bounces.txt"
    file.write_text("Case@example.com\ncase@example.com\nCASE@EXAMPLE.COM\nother@example.com\n", encoding="utf-8")
    # When it is imported, Then it is one address, newly suppressed (it said "3 address(es): 1 newly suppressed,
    # 2 already suppressed" of an address that was not)
    assert run(config, "import", str(file)) == 0
    assert capsys.readouterr().out == "imported 2 address(es): 2 newly suppressed, 0 already suppressed\n"


@pytest.mark.parametrize(
    "given",
    ["Budi Santoso <Budi@Example.com>", '"Santoso, Budi" <budi@example.com>', "<budi@example.com>",
     " Budi <budi@example.com> "],
)
def test_an_address_copied_with_its_name_from_a_mail_client_is_suppressed(
    config: Path, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    # Given the sender of an unsubscribe request to unsubscribe.mailto, as a mail client copies it (it was refused:
    # "A display name and angle brackets around the email address are not permitted here")
    # When the operator adds it, Then the address in the angle brackets is suppressed, and removed the same way
    assert run(config, "add", given) == 0
    assert capsys.readouterr().out == "budi@example.com: suppressed\n"
    assert run(config, "list", given) == 0
    assert "budi@example.com,manual,cli," in capsys.readouterr().out
    assert run(config, "remove", given) == 0
    assert capsys.readouterr().out.startswith("budi@example.com: removed from the suppression list (it was there as "
                                              "'manual', from cli, since ")


@pytest.mark.parametrize("given", ["Budi <budi@example.com>, Siti <siti@example.com>", "Budi <not an address>",
                                   "Budi <budi@example.com> later", "<budi@example.com"])
def test_names_with_two_addresses_or_a_bad_one_are_still_refused(
    config: Path, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    assert run(config, "add", given) == 2
    assert "invalid email address" in capsys.readouterr().err


def test_import_of_senders_as_a_mail_client_exports_them_takes_their_addresses(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "unsubscribe-requests.csv"
    text = ('email,subject\n"Budi Santoso <budi@example.com>",unsubscribe\n"Siti, A <SITI@example.com>",stop\n'
            "Agus <agus@>,x\n")  # fmt: skip
    assert imported(config, file, text, "--reason", "unsubscribed") == 1
    captured = capsys.readouterr()
    assert "imported 2 address(es): 2 newly suppressed, 0 already suppressed, 1 rejected" in captured.out
    assert f"{file}: line 4: invalid email address 'Agus <agus@>'" in captured.err


def test_remove_says_why_the_address_was_suppressed(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Given an address the customer's unsubscribe link put on the list
    from worker.adapters import db
    from worker.adapters.store import Store
    from worker.config import load_settings

    store = Store(db.engine_for(load_settings(config)))
    try:
        assert store.suppress("budi@example.com", reason="unsubscribed", source="unsubscribe-link",
                              now=datetime(2026, 12, 1, 3, 4, tzinfo=UTC))  # fmt: skip
    finally:
        store.close()
    # When the operator removes it (to resend a message the ledger refused: "on the suppression list"), Then it
    # says what was removed: the customer's own unsubscribe, not a bounce (it said only "removed")
    assert run(config, "remove", "Budi@example.com") == 0
    said = capsys.readouterr().out
    assert said == ("budi@example.com: removed from the suppression list (it was there as 'unsubscribed', from "
                    "unsubscribe-link, since 2026-12-01 03:04 UTC)\n")


def test_a_reason_with_spaces_around_it_is_stored_without_them(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a reason typed ' complaint' or only spaces was stored as typed: `list --reason complaint` did not find it, and
    # the list showed a blank reason
    assert run(config, "add", "budi@example.com", "--reason", " complaint ") == 0
    assert run(config, "add", "siti@example.com", "--reason", "   ") == 0
    capsys.readouterr()
    assert run(config, "list", "--reason", "complaint") == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("budi@example.com,complaint,cli,")
    assert run(config, "list", "siti@example.com") == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("siti@example.com,manual,cli,")


def test_a_list_of_senders_whose_first_name_has_a_comma_is_read_one_a_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the senders of unsubscribe requests pasted one a line as a mail client copies them, the first with a
    # name written 'Last, First' (it was read as a CSV whose header had no 'email' column: refused whole)
    file = tmp_path / "unsubscribe-requests.txt"
    file.write_text('"Santoso, Budi" <budi@example.com>\nSiti <siti@example.com>\n', encoding="utf-8")
    # When it is imported, Then both addresses are suppressed
    assert run(config, "import", str(file), "--reason", "unsubscribed") == 0
    assert capsys.readouterr().out == "imported 2 address(es): 2 newly suppressed, 0 already suppressed\n"



def test_a_line_of_many_spaces_is_rejected_in_one_pass(tmp_path: Path) -> None:
    # Given a file whose one line is two words with 400,000 spaces between (hostile, or a broken export)
    file = tmp_path / "bounces.txt"
    file.write_text("a" + " " * 400_000 + "b>\n", encoding="utf-8")
    script = ("import sys; from pathlib import Path; from worker.commands.suppressing import read_addresses; "
              "good, bad = read_addresses(Path(sys.argv[1]).read_text()); print(len(good), len(bad))")
    # When it is read, Then it is rejected as no address, at once: reading it as 'Name <address>' backtracked
    # quadratically (half an hour for this line), the command hanging (the bound is 100 times what it takes now)
    done = subprocess.run([sys.executable, "-c", script, str(file)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "0 1\n"), done.stderr[-2000:]


def test_the_name_of_an_imported_file_is_listed_as_the_source_without_its_control_characters(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a bounce list saved under the name its provider gave it: a reason with a line break is refused, but the
    # source, "import:<file name>", was stored as the name was and listed raw (a terminal escape, a line break)
    file = tmp_path / "bounces\x1b[2J\n\u202eevil.txt"
    assert imported(config, file, "siti@example.com\n") == 0
    listed = suppress_list(config, capsys)
    assert "siti@example.com,manual,import:bounces\\u001b[2J\\n\\u202eevil.txt," in listed, listed
    assert listed[:-1].replace("\n", "").isprintable() and len(listed.splitlines()) == 2, repr(listed)
    # and `suppress remove` says where it came from the same way
    assert run(config, "remove", "siti@example.com") == 0
    assert "from import:bounces\\u001b[2J\\n\\u202eevil.txt, since" in capsys.readouterr().out


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["no-bytes", "blank-lines"])
def test_import_of_an_empty_file_is_refused_as_an_empty_customers_file_is(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    # an empty file (a bounce export that came out empty, the wrong file) said "imported 0 address(es)" with exit 0,
    # while `kembali import customers` of an empty file is refused with exit 2
    file = tmp_path / "bounces.txt"
    code = imported(config, file, content)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.splitlines() == [
        f"kembali suppress import: {file}: the file is empty (expected one address a line, or a CSV with an email "
        "column): nothing was imported"
    ]
    assert captured.out == ""
    # a file of comments alone was written on purpose: imported, as a customers file of its header alone is
    assert imported(config, file, "# no bounces this week\n") == 0
    assert "imported 0 address(es)" in capsys.readouterr().out


def test_the_list_imported_into_another_database_keeps_each_address_reason(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a list with a complaint, a hard bounce and an unsubscribe, exported as `suppress list` writes it
    assert run(config, "add", "siti@example.com", "--reason", "complaint") == 0
    assert run(config, "add", "agus@example.com", "--reason", "hard_bounce") == 0
    assert run(config, "add", "budi@example.com", "--reason", "unsubscribed") == 0
    capsys.readouterr()
    assert run(config, "list") == 0
    exported = tmp_path / "list.csv"
    exported.write_text(capsys.readouterr().out, encoding="utf-8")
    # When another database (a move to PostgreSQL, a second shop) imports it
    (tmp_path / "other").mkdir()
    other = migrated_config(tmp_path / "other")
    assert run(other, "import", str(exported)) == 0
    capsys.readouterr()
    # Then each address keeps its reason: every one became 'manual', and `stats` counted no unsubscribe nor bounce
    listed = reasons(other, capsys)
    assert listed == {"siti@example.com": "complaint", "agus@example.com": "hard_bounce",
                      "budi@example.com": "unsubscribed"}  # fmt: skip


def test_a_reason_column_gives_each_address_its_reason_unless_reason_is_given(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "bounces.csv"
    file.write_text("email,reason\nsiti@example.com,complaint\nagus@example.com,\n"
                    f"budi@example.com,{'x' * 31}\nani@example.com,'-spam\n", encoding="utf-8")  # fmt: skip
    # an empty reason or one the list cannot hold takes the default (the address is suppressed all the same), the
    # latter named by its line; an apostrophe `suppress list` put before a formula's start is taken off
    assert run(config, "import", str(file)) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"{file}: line 4: reason must be at most 30 characters, not 31: "
                                         f"{'x' * 31!r}: suppressed as 'manual'"]  # fmt: skip
    assert "imported 4 address(es): 4 newly suppressed" in captured.out
    listed = reasons(config, capsys)
    assert listed == {"siti@example.com": "complaint", "agus@example.com": "manual", "budi@example.com": "manual",
                      "ani@example.com": "'-spam"}  # fmt: skip
    # --reason names every address of the file, whatever its column says
    other = tmp_path / "more.csv"
    assert imported(config, other, "email,reason\nwati@example.com,complaint\n", "--reason", "hard_bounce") == 0
    capsys.readouterr()
    assert run(config, "list", "wati@example.com") == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("wati@example.com,hard_bounce,")


def test_the_list_imported_into_another_database_keeps_each_entry_as_it_was(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given entries of last year: an unsubscribe (its link) and an operator's own, exported as `suppress list` writes
    exported = ("email,reason,source,created_at\n"
                "budi@example.com,unsubscribed,unsubscribe-link,2025-03-01T08:00:00+00:00\n"
                "siti@example.com,manual,cli,2025-04-02T09:30:00+00:00\n")  # fmt: skip
    # When another database imports it
    assert imported(config, tmp_path / "list.csv", exported) == 0
    # Then each entry lists back as it was exported: an unsubscribe of last year is no unsubscribe of this week in
    # `stats` (it was dated the moment of the import, from import:list.csv)
    assert suppress_list(config, capsys) == exported


@pytest.mark.postgres
def test_the_list_moved_to_postgresql_keeps_each_entry_as_it_was(
    config: Path, pg_migrated_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a list on SQLite with an unsubscribe, exported
    assert run(config, "add", "budi@example.com", "--reason", "unsubscribed") == 0
    exported = suppress_list(config, capsys)
    # When PostgreSQL imports it, Then it lists it back the same (its time to the microsecond, in UTC)
    other = tmp_path / "pg.toml"
    other.write_text(f'[database]\nurl = "{pg_migrated_url}"\n', encoding="utf-8")
    assert imported(other, tmp_path / "list.csv", exported) == 0
    assert suppress_list(other, capsys) == exported


def test_a_source_or_date_the_list_cannot_hold_is_the_import_s_own_named_by_its_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = ("email,source,created_at\nbudi@example.com,link\x1b[2J,2025-03-01T08:00:00+00:00\n"
            "siti@example.com,cli,yesterday\nani@example.com,cli,2999-01-01T00:00:00+00:00\n"
            "wati@example.com,cli,0001-01-01T00:00:00+01:00\n")  # fmt: skip
    # (the last one, before the first year in UTC, stopped the import with an OverflowError's traceback)
    assert imported(config, tmp_path / "list.csv", text) == 1
    err = capsys.readouterr().err.splitlines()
    assert [e.split(": ")[1] for e in err] == ["line 2", "line 3", "line 4", "line 5"]
    assert "source must be one line of text without control characters" in err[0]
    assert "created_at 'yesterday' is no ISO 8601 time" in err[1] and "later than now" in err[2]
    rows = {r.split(",")[0]: r.split(",")[2:] for r in suppress_list(config, capsys).splitlines()[1:]}
    assert rows["budi@example.com"] == ["import:list.csv", "2025-03-01T08:00:00+00:00"]
    assert rows["siti@example.com"][0] == "cli" and rows["ani@example.com"][0] == "cli"
    assert not rows["siti@example.com"][1].startswith("2025") and not rows["ani@example.com"][1].startswith("2999")


def test_the_problems_of_an_import_are_named_in_the_order_of_their_lines(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a list whose line 2 has a reason the list cannot hold, line 3 no address and line 4 a bad date
    text = ("email,reason,created_at\nbudi@example.com,\x1b[2J,\nbroken@,manual,\n"
            "siti@example.com,manual,yesterday\n")  # fmt: skip
    # When it is imported
    assert imported(config, tmp_path / "list.csv", text) == 1
    # Then its problems come as the file has them, line 2 first: not the rejected addresses first, then the cells
    err = capsys.readouterr().err.splitlines()
    assert [e.split(": ")[1] for e in err] == ["line 2", "line 3", "line 4"], err


def test_an_address_listed_twice_keeps_the_customer_s_own_wish_whichever_line_comes_first(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the lists of two shops joined into one file: an address an operator added in the first, and that the
    # customer unsubscribed (or complained) from in the second, once in another case
    file = tmp_path / "joined.csv"
    file.write_text("email,reason\nbudi@example.com,manual\nsiti@example.com,hard_bounce\n"
                    "budi@example.com,unsubscribed\nSITI@example.com,complaint\n", encoding="utf-8")  # fmt: skip
    # When it is imported
    assert run(config, "import", str(file)) == 0
    assert "imported 2 address(es): 2 newly suppressed" in capsys.readouterr().out
    # Then each is listed as the customer's own wish (a resend refused for it advises closing the message, not
    # clearing the entry as for an operator's own or a bounce): the first line won, 'manual' and 'hard_bounce'
    listed = reasons(config, capsys)
    assert listed == {"budi@example.com": "unsubscribed", "siti@example.com": "complaint"}


def test_an_address_whose_reason_cell_is_not_kept_is_counted_as_imported_not_rejected(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "bounces.csv"
    assert imported(config, file, f"email,reason\nbudi@example.com,{'x' * 31}\nagus@,manual\n") == 1
    # the summary said '1 address(es) … 1 newly suppressed, … 2 rejected': budi is suppressed (as 'manual')
    assert capsys.readouterr().out == ("imported 1 address(es): 1 newly suppressed, 0 already suppressed, 1 rejected, "
                                       "1 cell the list cannot hold taken as its default\n")  # fmt: skip


def test_a_reason_of_kembali_s_own_in_another_case_is_stored_as_kembali_writes_it(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a list from another tool, its reasons capitalised
    file = tmp_path / "other-tool.csv"
    assert imported(config, file, "Email,Reason\nbudi@example.com,Unsubscribed\nsiti@example.com,HARD_BOUNCE\n"
                                  "agus@example.com,Left the shop\n") == 0  # fmt: skip
    capsys.readouterr()
    # Then the reasons Kembali writes itself are stored as it writes them: 'Unsubscribed' was no unsubscribe to
    # `stats`, `list --reason unsubscribed` or a resend's advice; another reason is kept as given
    listed = reasons(config, capsys)
    assert listed == {"budi@example.com": "unsubscribed", "siti@example.com": "hard_bounce",
                      "agus@example.com": "Left the shop"}  # fmt: skip


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_file_that_is_not_utf8_is_refused_naming_the_line_and_the_byte(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], bom: bytes
) -> None:
    # Given a CSV saved by Excel as 'CSV UTF-8' (a byte-order mark) with a line pasted from a Latin-1 export
    file = tmp_path / "bounces.csv"
    file.write_bytes(bom + b"email,reason\r\nani@example.com,complaint\r\nj\xe9r@example.com,manual\r\n")
    # When it is imported, it is refused naming the line and the byte that are not UTF-8 (with the mark, it named
    # line 2 and byte 0x0d, the line break three bytes before)
    assert run(config, "import", str(file)) == 2
    assert f"{file}: line 3: not UTF-8 text (byte 0xe9)" in capsys.readouterr().err


UTF16 = "is UTF-16 text (Excel's 'Unicode Text'): save the sheet as 'CSV UTF-8'"


@pytest.mark.parametrize(
    ("content", "says"),
    [("email\r\nbudi@example.com\r\n".encode("utf-16"), UTF16),
     ("email\r\nbudi@example.com\r\n".encode("utf-16-le"), UTF16),  # no byte-order mark
     (gzip.compress(b"email\nbudi@example.com\n"), "is compressed with gzip: decompress it first (gunzip)"),
     (b"PK\x03\x04\x14\x00\x06\x00", "is a zip file (an .xlsx workbook?): save the sheet as 'CSV UTF-8'")],
    ids=["utf-16", "utf-16-without-bom", "gzip", "xlsx"],
)
def test_a_file_that_is_no_text_is_refused_saying_what_it_is_as_import_says(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, says: str
) -> None:
    # Given a bounce list saved as Excel's 'Unicode Text', or still compressed, or a workbook
    file = tmp_path / "bounces.txt"
    file.write_bytes(content)
    # When it is imported, it is refused as `kembali import` refuses such a file, saying what it is and what to do:
    # it said "not UTF-8 text (byte 0xff)" or "(byte 0x8b)", and a UTF-16 file without a byte-order mark had each
    # line rejected as an address of NUL characters (exit 1)
    code = run(config, "import", str(file))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.splitlines() == [f"kembali suppress import: {file}: the file {says}: nothing was imported"], err
    assert suppress_list(config, capsys).splitlines()[1:] == []


def test_a_quote_left_open_in_the_last_column_names_the_addresses_it_took_in(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a complaints export whose second line opens a quote in its last column and never closes it
    text = 'email,reason\nani@example.com,"complaint\nbudi@example.com,complaint\ncici@example.com,complaint\n'
    # When it is imported (Budi and Cici were read into Ani's reason: neither suppressed, and no line said so but
    # "reason must be one line of text", exit 1 as for any reason cell not kept)
    assert imported(config, tmp_path / "complaints.csv", text) == 1
    err = capsys.readouterr().err
    # Then that row is rejected, naming the lines it took in, so that the file is mended and imported again
    assert ("line 2: column 2 'reason' holds a quote left open; it takes in lines 2 to 4, none of which is imported"
            in err), err
    assert suppress_list(config, capsys).splitlines()[1:] == []


def test_removing_an_unsubscribe_names_the_addresses_it_followed_the_customer_to(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given C1 unsubscribed at budi@, then moved twice (two customers imports): the unsubscribe followed them
    from worker.adapters import db, shop
    from worker.adapters.store import Store
    from worker.config import load_settings
    from worker.domain import CustomerRecord, Locale

    def at(email: str) -> CustomerRecord:
        return CustomerRecord("C1", email, "Budi", Locale.ID, "Asia/Jakarta", None, True, "", "")

    when = datetime(2026, 12, 1, 3, 4, tzinfo=UTC)
    store = Store(db.engine_for(load_settings(config)))
    try:
        shop.upsert_customers(store.engine, [at("budi@example.com")], when)
        store.suppress("budi@example.com", reason="unsubscribed", source="unsubscribe-link", now=when)
        shop.upsert_customers(store.engine, [at("budi.baru@example.org")], when)
        shop.upsert_customers(store.engine, [at("budi_2@example.net")], when)
    finally:
        store.close()
    # When the operator removes the address the customer unsubscribed at
    assert run(config, "remove", "budi@example.com") == 0
    # Then it says what it removed, and that the addresses the unsubscribe followed the customer to stay suppressed,
    # with how to remove them too: the customer may want email again, or the old mailbox may be another's now
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith("budi@example.com: removed from the suppression list (it was there as 'unsubscribed'")
    assert said[1:] == [
        "note: budi.baru@example.org stays suppressed (customer C1 moved from budi@example.com, and their "
        "unsubscribe followed them): `kembali suppress remove budi.baru@example.org` too if the customer asked for "
        "email again",
        "note: budi_2@example.net stays suppressed (customer C1 moved from budi.baru@example.org, and their "
        "unsubscribe followed them): `kembali suppress remove budi_2@example.net` too if the customer asked for "
        "email again",
    ]
    assert set(reasons(config, capsys)) == {"budi.baru@example.org", "budi_2@example.net"}
    # And removing one the unsubscribe followed to says where it came from
    assert run(config, "remove", "budi_2@example.net") == 0
    assert capsys.readouterr().out == (
        "budi_2@example.net: removed from the suppression list (it was there as 'unsubscribed', from customer C1 "
        "moved from budi.baru@example.org, since 2026-12-01 03:04 UTC)\n")


def test_an_endless_file_is_refused_as_no_text_without_being_read_to_its_end(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `suppress import /dev/zero` read the whole "file" into memory: a MemoryError traceback after 24 GB
    code = run(config, "import", "/dev/zero")
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("kembali suppress import: /dev/zero: the file is "), err
    assert err.rstrip().endswith("nothing was imported"), err


def test_a_file_larger_than_a_list_may_be_is_refused_naming_the_bound(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a bound of 1 KiB (512 MiB in use: about 15 million addresses) and a file of 60 addresses past it
    from worker.commands import suppressing

    monkeypatch.setattr(suppressing, "MAX_LIST_BYTES", 1024)
    file = tmp_path / "bounces.txt"
    file.write_text("".join(f"pelanggan{n:03}@example.com\n" for n in range(60)), encoding="utf-8")
    # When it is imported, it is refused, nothing of it suppressed
    assert run(config, "import", str(file)) == 2
    assert capsys.readouterr().err == (f"kembali suppress import: {file}: larger than 1 KiB, the most a list "
                                       "may be: split it: nothing was imported\n")
    assert suppress_list(config, capsys).splitlines()[1:] == []
