"""`python -m services.proxy`: build settings, configure telemetry, serve until SIGTERM."""

from __future__ import annotations

from shared.httpedge import run_service, settings_or_exit
from shared.telemetry import configure_logging, configure_tracing

from .app import create_app
from .settings import Settings


def main() -> None:
    settings = settings_or_exit(Settings)
    configure_logging("proxy", level=settings.log_level, fmt=settings.log_format)
    configure_tracing("proxy")
    run_service(create_app(settings), settings)


if __name__ == "__main__":
    main()
