"""Every refusal an edge can produce is asserted by a test that drives that edge.

"Can produce": a code raised in the edge's own package (`code="..."` or `Refusal.X`)
plus what the shared signed-request check and admission answer for it. "Asserted":
the code appears (as a string or as `Refusal.X`) in a suite that runs the edge as a
real process (its service tests, the proofs, the end-to-end suites). A new refusal
without a test fails here; so does a gap that got a test and is still listed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shared.contract import Refusal

ROOT = Path(__file__).resolve().parents[2]

# Raised for both edges by shared code: the guard, the signature check, the admission.
SHARED = frozenset(
    {
        Refusal.TOKEN_MISSING,
        Refusal.TOKEN_INVALID,
        Refusal.TOKEN_EXPIRED,
        Refusal.SIGNATURE_MISSING,
        Refusal.SIGNATURE_INVALID,
        Refusal.SIGNATURE_EXPIRED,
        Refusal.SIGNATURE_FUTURE,
        Refusal.SIGNATURE_UNKNOWN_KEY,
        Refusal.SIGNATURE_MALFORMED,
        Refusal.SIGNATURE_INCOMPLETE,
        Refusal.DIGEST_MISSING,
        Refusal.DIGEST_MISMATCH,
        Refusal.REPLAY_DETECTED,
        Refusal.IP_BLOCKED,
        Refusal.SECURITY_UNAVAILABLE,
    }
)
# Codes an edge can produce that no test drives yet: each one is a known gap, kept
# here so it cannot grow silently.
KNOWN_GAPS: dict[str, frozenset[str]] = {
    "proxy": frozenset(),
    "token": frozenset(),
}


def _files(*folders: str) -> list[Path]:
    return [path for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))]


def _codes_in(paths: list[Path], *, strings: bool) -> set[str]:
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "Refusal":
                if node.attr.isupper():
                    found.add(Refusal[node.attr].value)
            elif isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                        found.add(str(keyword.value.value))
            elif (
                strings
                and isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and Refusal.parse(node.value) is not None
            ):
                found.add(node.value)
    return found


@pytest.mark.parametrize("edge", ["proxy", "token"])
def test_every_refusal_of_an_edge_is_driven_by_a_test(edge: str) -> None:
    produced = _codes_in(_files(f"services/{edge}"), strings=False) | {r.value for r in SHARED}
    produced = {code for code in produced if Refusal.parse(code) is not None}
    suites = _files(f"tests/services/{edge}", "tests/proofs", "tests/e2e")
    # this file names codes too, but drives nothing
    tested = _codes_in([path for path in suites if path != Path(__file__)], strings=True)
    untested = produced - tested
    assert untested == KNOWN_GAPS[edge], (
        f"untested now: {sorted(untested - KNOWN_GAPS[edge])}; "
        f"covered, drop from KNOWN_GAPS: {sorted(KNOWN_GAPS[edge] - untested)}"
    )
