"""A configured Kembali folder for end-to-end tests: config.toml, a migrated SQLite file, a shop."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tests.db_fixtures import migrate
from tests.smtp_server import closed_port
from worker.adapters import db, shop
from worker.config import Settings, load_settings
from worker.demo import ShopData

REPO = Path(__file__).resolve().parent.parent
LINK_SECRET = "test-link-secret-0123456789abcdef"


@dataclass
class Site:
    folder: Path
    config: Path
    settings: Settings

    @property
    def db_path(self) -> Path:
        return self.folder / "kembali.db"

    def env(self) -> dict[str, str]:
        import os

        return {**os.environ, "KEMBALI_LINK_SECRET": LINK_SECRET}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``python -m worker --config <this> ARGS`` from the repository root."""
        return subprocess.run(
            [sys.executable, "-m", "worker", "--config", str(self.config), *args],
            cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip


def make_site(
    folder: Path, *, smtp_port: int | None = None, extra_toml: str = "", copy_templates: bool = False
) -> Site:
    """A folder with config.toml (SQLite file next to it), the schema migrated; its SMTP port is one nobody listens on
    unless ``smtp_port`` is given (a fixed 2525 reached whatever listened there on the machine)."""
    if smtp_port is None:
        smtp_port = closed_port()
    folder.mkdir(parents=True, exist_ok=True)
    templates = REPO / "templates" / "email"
    if copy_templates:
        shutil.copytree(templates, folder / "templates")
        templates = folder / "templates"
    config = folder / "config.toml"
    config.write_text(
        f'[database]\nurl = "sqlite:///kembali.db"\n\n'
        f'[smtp]\nhost = "127.0.0.1"\nport = {smtp_port}\ntimeout_seconds = 5.0\npool_size = 2\n\n'
        f'[templates]\ndir = "{templates.as_posix()}"\n\n'
        f'[logging]\nlevel = "warning"\n\n{extra_toml}',
        encoding="utf-8",
    )
    settings = load_settings(config)
    migrate(settings.database_url)
    return Site(folder, config, settings)


def load_shop(settings: Settings, data: ShopData, now: datetime) -> None:
    engine = db.create_engine(settings.database_url)
    try:
        shop.upsert_customers(engine, data.customers, now)
        shop.upsert_products(engine, data.products, now)
        shop.upsert_orders(engine, data.orders, now)
    finally:
        engine.dispose()
