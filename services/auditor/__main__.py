"""`python -m services.auditor`: consume usage and audit events, raise alerts."""

from __future__ import annotations

from services.auditor.app import create_app
from services.auditor.settings import Settings
from shared.httpedge import run_service, settings_or_exit
from shared.telemetry import configure_logging, configure_tracing


def main() -> None:
    settings = settings_or_exit(Settings)
    configure_logging("auditor", level=settings.log_level, fmt=settings.log_format)
    configure_tracing("auditor")
    run_service(create_app(settings), settings)


if __name__ == "__main__":
    main()
