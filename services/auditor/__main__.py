"""`python -m services.auditor`: consume usage and audit events, raise alerts."""

from __future__ import annotations

from services.auditor.app import create_app
from services.auditor.settings import Settings
from shared.httpedge import serve_main


def main() -> None:
    serve_main("auditor", Settings, create_app)


if __name__ == "__main__":
    main()
