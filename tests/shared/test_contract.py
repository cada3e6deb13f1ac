"""The refusal table is the only one: README, raise sites and v1 reasons agree with it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from shared import errors
from shared.contract import Category, Refusal, category_of, markdown_table, refusal_category
from shared.errors import ApiError, AuthError, RateLimitedError, UnavailableError

ROOT = Path(__file__).resolve().parents[2]
_STATUS = {
    name: cls.status
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, ApiError)
}
_STATUS.update(
    SignatureError=401,
    SignatureExpiredError=401,
    SignatureFormatError=400,
    DigestError=400,
    LoginError=401,
)


def _raise_sites() -> list[tuple[str, str, str]]:
    """(file:line, error class, code) for every `SomeError(..., code="literal")`."""
    sites = []
    for folder in ("services", "shared"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "testing" in path.parts:
                continue  # the fake provider speaks the provider's codes, not ours
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in ("_refuse", "error_response"):  # (status, code, message) answers
                    status, code = node.args[:2] if len(node.args) >= 2 else (None, None)
                    if isinstance(status, ast.Constant) and isinstance(code, ast.Constant):
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        sites.append((where, f"status {status.value}", str(code.value)))
                        _STATUS[f"status {status.value}"] = int(status.value)
                    continue
                if not name or not name.endswith("Error"):
                    continue
                for keyword in node.keywords:
                    if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                        where = f"{path.relative_to(ROOT)}:{node.lineno}"
                        sites.append((where, name, str(keyword.value.value)))
    return sites


def test_the_readme_table_is_the_enum() -> None:
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- refusals:begin -->\n", "<!-- refusals:end -->"
    assert begin in readme
    assert end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == markdown_table(), "regenerate with `python -m shared.contract`"


def test_every_raised_code_is_in_the_table_with_its_status() -> None:
    sites = _raise_sites()
    assert len(sites) > 50  # the scan sees the code base
    problems = []
    for where, name, code in sites:
        refusal = Refusal.parse(code)
        if refusal is None:
            problems.append(f"{where}: {code} is not a shared.contract.Refusal")
        elif name in _STATUS and _STATUS[name] != refusal.status:
            problems.append(f"{where}: {name} answers {_STATUS[name]}, {code} is {refusal.status}")
    assert problems == [], "\n".join(problems)


def test_error_classes_default_codes_are_in_the_table() -> None:
    for cls in _all_subclasses(ApiError):
        refusal = Refusal.parse(cls.default_code)
        assert refusal is not None, cls
        assert refusal.status == cls.status, cls


def _all_subclasses(cls: type[ApiError]) -> list[type[ApiError]]:
    import shared.signing  # noqa: F401

    out: list[type[ApiError]] = []
    todo = [cls]
    while todo:
        each = todo.pop()
        out.append(each)
        todo.extend(each.__subclasses__())
    return out


def test_a_refusal_raises_the_class_of_its_status() -> None:
    missing = Refusal.TOKEN_MISSING.error()
    assert isinstance(missing, AuthError)
    assert (missing.status, missing.code, missing.message) == (
        401,
        "token_missing",
        Refusal.TOKEN_MISSING.message,
    )
    blocked = Refusal.IP_BLOCKED.error(headers={"Retry-After": "3"})
    assert isinstance(blocked, RateLimitedError)
    assert (blocked.status, blocked.headers) == (429, {"Retry-After": "3"})
    assert isinstance(Refusal.SECURITY_UNAVAILABLE.error("x"), UnavailableError)
    assert Refusal.METHOD_NOT_ALLOWED.error().status == 405


def test_every_unavailable_refusal_says_when_to_retry() -> None:
    unavailable = [r for r in Refusal if r.category is Category.unavailable]
    assert len(unavailable) >= 8
    for refusal in unavailable:
        assert refusal.error().headers == {"Retry-After": "1"}, refusal
    # The raiser's own value stands, whatever its case; other headers are kept.
    kept = Refusal.IDENTITY_UNAVAILABLE.error(headers={"retry-after": "5", "X-A": "b"})
    assert kept.headers == {"retry-after": "5", "X-A": "b"}
    assert Refusal.TOKEN_MISSING.error().headers == {}


def test_codes_are_unique_snake_case() -> None:
    values = [member.value for member in Refusal]
    assert len(values) == len(set(values))
    assert all(value.replace("_", "").isalpha() and value.islower() for value in values)
    assert Refusal.BUDGET_EXCEEDED.status == 429
    assert Refusal.BUDGET_EXCEEDED.category is Category.limit


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        # v2: codes and categories
        ("replay_detected", Category.replay),
        ("digest_mismatch", Category.tamper),
        ("token_missing", Category.auth),
        ("ip_blocked", Category.blocked),
        ("tamper", Category.tamper),
        # v1 reasons, still in the streams for the retention period
        ("replay", Category.replay),
        ("nonce_reused", Category.replay),
        ("signature", Category.tamper),
        ("digest", Category.tamper),
        ("missing_token", Category.auth),
        ("invalid_token", Category.auth),
        ("invalid_login_expired", Category.auth),
        ("blocked", Category.blocked),
        ("cache_hit", None),
        (None, None),
    ],
)
def test_event_reasons_map_onto_categories(reason: str | None, category: Category | None) -> None:
    assert category_of(reason) is category


def test_an_unknown_code_gets_a_category_from_its_status() -> None:
    assert refusal_category(ApiError("x", code="made_up")) is Category.internal
    assert refusal_category(AuthError("x", code="made_up")) is Category.auth
    assert refusal_category(RateLimitedError("x", code="made_up")) is Category.limit
