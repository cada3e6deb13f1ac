"""SDP offers from browsers: checked before anything goes upstream.

Not a full RFC 8866 parser: it checks what decides whether a body is a usable WebRTC
offer (size cap, line grammar, the mandatory session lines, at least one media
section with ICE credentials and a DTLS fingerprint) and that it is an offer, not an
answer: an offerer must use `a=setup:actpass` (RFC 8842 §5.3), an answerer never does.
"""

from __future__ import annotations

import re

from shared.errors import BadRequestError

__all__ = ["check_answer", "check_offer"]

_LINE = re.compile(r"[a-z]=[\x20-\x7e\x80-\U0010ffff\t]*")


def _lines(sdp: str, what: str) -> list[str]:
    if not sdp.startswith("v=0"):
        raise BadRequestError(f"the {what} is not SDP (must start with v=0)", code="sdp_invalid")
    lines = sdp.replace("\r\n", "\n").rstrip("\n").split("\n")
    for line in lines:
        if not _LINE.fullmatch(line):
            raise BadRequestError(f"the {what} has a malformed line", code="sdp_invalid")
    return lines


def check_offer(sdp: object, *, max_bytes: int) -> str:
    """The offer, unchanged, if it is a well-formed WebRTC offer; a 400 otherwise."""
    if not isinstance(sdp, str) or not sdp:
        raise BadRequestError("transport.sdp must be the SDP offer", code="sdp_invalid")
    if len(sdp.encode()) > max_bytes:
        raise BadRequestError(f"the SDP offer exceeds {max_bytes} bytes", code="sdp_too_large")
    lines = _lines(sdp, "offer")
    kinds = {line[0] for line in lines}
    if not {"o", "s", "t", "m"} <= kinds:
        raise BadRequestError("the SDP offer lacks o=, s=, t= or m= lines", code="sdp_invalid")
    attributes = {line[2:].split(":", 1)[0] for line in lines if line.startswith("a=")}
    if not {"ice-ufrag", "ice-pwd", "fingerprint"} <= attributes:
        raise BadRequestError(
            "the SDP offer lacks ICE credentials or a DTLS fingerprint", code="sdp_invalid"
        )
    setups = {line[len("a=setup:") :].strip() for line in lines if line.startswith("a=setup:")}
    if setups != {"actpass"}:
        raise BadRequestError("the SDP is not an offer (a=setup:actpass)", code="sdp_not_offer")
    return sdp


def check_answer(sdp: object, *, max_bytes: int) -> str:
    """The provider's answer, if it looks like SDP; callers answer 502 otherwise."""
    if not isinstance(sdp, str) or not sdp or len(sdp.encode()) > 4 * max_bytes:
        raise ValueError("not an SDP answer")
    try:
        _lines(sdp, "answer")
    except BadRequestError:
        raise ValueError("not an SDP answer") from None
    return sdp
