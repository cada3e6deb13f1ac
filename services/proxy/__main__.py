"""`python -m services.proxy`: build settings, configure telemetry, serve until SIGTERM."""

from __future__ import annotations

from services.proxy.app import create_app
from services.proxy.settings import Settings
from shared.httpedge import serve_main


def main() -> None:
    serve_main("proxy", Settings, create_app)


if __name__ == "__main__":
    main()
