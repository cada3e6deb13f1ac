"""SDP offers and answers as browsers and WebRTC peers write them (for voice tests)."""

from __future__ import annotations

__all__ = ["ANSWER", "OFFER", "offer"]


def offer(*, setup: str = "actpass", padding: int = 0) -> str:
    lines = [
        "v=0",
        "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "a=msid-semantic: WMS",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=rtcp:9 IN IP4 0.0.0.0",
        "a=ice-ufrag:8hhY",
        "a=ice-pwd:asd88fgpdd777uzjYhagZg0jIrkmPM7s",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:"
        "DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
        f"a=setup:{setup}",
        "a=mid:0",
        "a=sendrecv",
        "a=rtcp-mux",
        "a=rtpmap:111 opus/48000/2",
        "a=fmtp:111 minptime=10;useinbandfec=1",
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
        "c=IN IP4 0.0.0.0",
        "a=ice-ufrag:8hhY",
        "a=ice-pwd:asd88fgpdd777uzjYhagZg0jIrkmPM7s",
        f"a=setup:{setup}",
        "a=mid:1",
        "a=sctp-port:5000",
    ]
    lines.extend(f"a=x-pad:{'p' * 60}" for _ in range(padding))
    return "\r\n".join(lines) + "\r\n"


OFFER = offer()
ANSWER = offer(setup="active")
