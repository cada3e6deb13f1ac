"""A small real OIDC issuer for tests: discovery document and JWKS over HTTP, keys made here.

It signs logins with PyJWT and publishes the public halves with PyJWT's JWK export;
keys can be rotated, and the JWKS endpoint can be made unreachable (the connection is
dropped without an answer) while the test runs.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

__all__ = ["SigningKey", "TestIssuer"]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: str
    private: PrivateKey = field(repr=False)

    @classmethod
    def new(cls, algorithm: str = "RS256") -> SigningKey:
        private: PrivateKey
        if algorithm == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif algorithm == "EdDSA":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            raise ValueError(algorithm)
        return cls(kid=f"k-{uuid.uuid4().hex[:8]}", algorithm=algorithm, private=private)

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        exported: Any
        if isinstance(public, rsa.RSAPublicKey):
            exported = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            exported = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            exported = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**exported, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


class TestIssuer:
    """`issuer` URL, `/.well-known/openid-configuration`, `/jwks`; counts JWKS fetches."""

    __test__ = False  # not a pytest class

    def __init__(self, audience: str = "keyveil-app") -> None:
        self.audience = audience
        self.keys: list[SigningKey] = [SigningKey.new("RS256")]
        self.jwks_hits = 0
        self.unreachable = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/jwks":
                    outer.jwks_hits += 1
                    if outer.unreachable:
                        self.close_connection = True
                        self.connection.close()  # no answer at all
                        return
                    self._json({"keys": [k.jwk() for k in outer.keys]})
                elif self.path == "/.well-known/openid-configuration":
                    self._json({"issuer": outer.issuer, "jwks_uri": f"{outer.issuer}/jwks"})
                else:
                    self.send_error(404)

            def _json(self, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format: str, *args: Any) -> None:
                return

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                return  # a dropped connection (unreachable mode) is the point, not news

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def key(self) -> SigningKey:
        return self.keys[0]

    def rotate(self, algorithm: str = "RS256", *, keep_old: bool = False) -> SigningKey:
        """A new signing key at the front; the old ones dropped unless `keep_old`."""
        new = SigningKey.new(algorithm)
        self.keys = [new, *self.keys] if keep_old else [new]
        return new

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-123@example.test",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,  # every login distinct (the service caches verified ones)
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def login(
        self,
        key: SigningKey | None = None,
        *,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A login token signed with `key` (default: the current key)."""
        signer = key or self.key
        return jwt.encode(
            self.claims(**claims),
            signer.private,
            algorithm=signer.algorithm,
            headers={"kid": signer.kid, **(headers or {})},
        )
