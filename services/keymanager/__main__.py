"""`python -m services.keymanager`: build settings, then serve until SIGTERM."""

from __future__ import annotations

from services.keymanager.app import create_app
from services.keymanager.settings import Settings
from shared.httpedge import serve_main


def main() -> None:
    serve_main("keymanager", Settings, create_app)


if __name__ == "__main__":
    main()
