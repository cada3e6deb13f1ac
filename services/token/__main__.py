"""`python -m services.token`: build settings, configure telemetry, serve until SIGTERM."""

from __future__ import annotations

from services.token.app import create_app
from services.token.settings import Settings
from shared.httpedge import serve_main


def main() -> None:
    serve_main("token", Settings, create_app)


if __name__ == "__main__":
    main()
