"""`python -m services.token`: build settings, configure telemetry, serve until SIGTERM."""

from __future__ import annotations

from services.token.app import create_app
from services.token.settings import Settings
from shared.httpedge import run_service, settings_or_exit
from shared.telemetry import configure_logging, configure_tracing


def main() -> None:
    settings = settings_or_exit(Settings)
    configure_logging("token", level=settings.log_level, fmt=settings.log_format)
    configure_tracing("token")
    run_service(create_app(settings), settings)


if __name__ == "__main__":
    main()
