"""`python -m services.keymanager`: build settings, then serve until SIGTERM."""

from __future__ import annotations

from services.keymanager.app import create_app
from services.keymanager.settings import Settings
from shared.httpedge import run_service, settings_or_exit
from shared.telemetry import configure_logging, configure_tracing


def main() -> None:
    settings = settings_or_exit(Settings)
    configure_logging("keymanager", level=settings.log_level, fmt=settings.log_format)
    configure_tracing("keymanager")
    run_service(create_app(settings), settings)


if __name__ == "__main__":
    main()
