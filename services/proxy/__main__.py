"""`python -m services.proxy`: build settings, configure telemetry, serve until SIGTERM."""

from __future__ import annotations

from services.proxy.app import create_app
from services.proxy.settings import Settings
from shared.serving import serve_edge


def main() -> None:
    serve_edge(
        "proxy",
        Settings,
        create_app,
        module="services.proxy",
        server=lambda settings: settings.http_server,
        workers=lambda settings: settings.workers,
    )


if __name__ == "__main__":
    main()
