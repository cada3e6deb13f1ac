"""`python -m services.proxy`: build settings, configure telemetry, serve until SIGTERM."""

from __future__ import annotations

from typing import Any

from services.proxy.settings import Settings
from shared.serving import serve_edge


def _create_app(settings: Settings) -> Any:
    # Imported here, not above: a KEYVEIL_WORKERS supervisor must not define metrics.
    from services.proxy.app import create_app

    return create_app(settings)


def main() -> None:
    serve_edge(
        "proxy",
        Settings,
        _create_app,
        module="services.proxy",
        server=lambda settings: settings.http_server,
        workers=lambda settings: settings.workers,
    )


if __name__ == "__main__":
    main()
