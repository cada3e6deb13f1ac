"""Real KEK servers for the custody suite: OpenBao (`bao server -dev`) and moto's KMS.

Both run as subprocesses on free ports, like NATS and Redis. OpenBao writes a file audit
log (declared in its config file, the only way OpenBao 2.x enables one) that the suite
reads for leaks. `KekBackend` gives each test its own transit key or KMS key, a policy
that grants only what the key-manager needs, and the levers a test pulls: rotate, deny,
allow.
"""

from __future__ import annotations

import os
import secrets
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import hvac

from keyveil.servers import ServerProcess, free_port
from tests.support import TEST_KEY_ENCRYPTION_SECRET

__all__ = ["KekBackend", "OpenBao", "start_moto", "start_openbao"]

ROOT_TOKEN = "root-" + secrets.token_hex(8)
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _bin(name: str) -> str:
    import sys

    return str(Path(sys.executable).parent / name)


@dataclass
class OpenBao:
    server: ServerProcess
    audit_log: Path

    @property
    def addr(self) -> str:
        return self.server.url

    def root(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=ROOT_TOKEN)


def start_openbao(directory: Path) -> OpenBao:
    port = free_port()
    audit_log = directory / "openbao-audit.log"
    config = directory / "openbao.hcl"
    config.write_text(
        f'audit "file" "keyveil-test" {{\n  options {{\n    file_path = "{audit_log}"\n  }}\n}}\n'
    )
    server = ServerProcess(
        name="openbao",
        url=f"http://127.0.0.1:{port}",
        port=port,
        argv=[
            _bin("bao"),
            "server",
            "-dev",
            f"-dev-root-token-id={ROOT_TOKEN}",
            f"-dev-listen-address=127.0.0.1:{port}",
            f"-config={config}",
        ],
        log_path=directory / "openbao.log",
        env={"BAO_LOG_LEVEL": "warn", "HOME": str(directory)},
    )
    server.start(timeout=30)
    bao = OpenBao(server, audit_log)
    root = bao.root()
    root.sys.enable_secrets_engine("transit", path="transit")
    root.sys.enable_auth_method("approle", path="approle")
    return bao


def start_moto(directory: Path) -> ServerProcess:
    port = free_port()
    server = ServerProcess(
        name="moto",
        url=f"http://127.0.0.1:{port}",
        port=port,
        argv=[_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        log_path=directory / "moto.log",
    )
    server.start(timeout=30)
    return server


def _policy(mount: str, key: str, *, decrypt: bool) -> str:
    paths = ["encrypt", "rewrap"] + (["decrypt"] if decrypt else [])
    rules = [f'path "{mount}/{p}/{key}" {{ capabilities = ["update"] }}' for p in paths]
    rules.append(f'path "{mount}/keys/{key}" {{ capabilities = ["read"] }}')
    return "\n".join(rules) + "\n"


@dataclass
class KekBackend:
    """One provider for one test: settings overrides, and what a test does to the KEK."""

    name: str
    bao: OpenBao | None = None
    moto: ServerProcess | None = None
    key: str = field(default_factory=lambda: "keyveil-" + uuid.uuid4().hex[:10])
    secret: str = TEST_KEY_ENCRYPTION_SECRET
    previous_secret: str | None = None
    token: str | None = None
    kms_key_id: str | None = None

    def __post_init__(self) -> None:
        if self.name == "vault-transit":
            assert self.bao is not None
            root = self.bao.root()
            root.secrets.transit.create_key(name=self.key, derived=True)
            root.sys.create_or_update_policy(self.key, _policy("transit", self.key, decrypt=True))
            self.token = root.auth.token.create(policies=[self.key], ttl="2h")["auth"][
                "client_token"
            ]
        elif self.name == "aws-kms":
            self.kms_key_id = self.kms().create_key(Description=self.key)["KeyMetadata"]["KeyId"]

    def kms(self) -> Any:
        assert self.moto is not None
        return boto3.session.Session().client("kms", endpoint_url=self.moto.url, **_aws())

    def overrides(self) -> dict[str, Any]:
        values: dict[str, Any] = {"KEK_PROVIDER": self.name, "KEK_TIMEOUT_S": 2}
        if self.name == "local":
            values["KEY_ENCRYPTION_SECRET"] = self.secret
            if self.previous_secret:
                values["KEY_ENCRYPTION_SECRET_PREVIOUS"] = self.previous_secret
        elif self.name == "vault-transit":
            assert self.bao is not None
            values.update(
                KEY_ENCRYPTION_SECRET=None,  # no KEK secret at all beside a remote provider
                VAULT_ADDR=self.bao.addr,
                VAULT_TRANSIT_KEY=self.key,
                VAULT_TOKEN=self.token,
            )
        else:
            assert self.moto is not None
            values.update(
                KEY_ENCRYPTION_SECRET=None,
                KMS_KEY_ID=self.kms_key_id,
                AWS_ENDPOINT_URL=self.moto.url,
            )
        return values

    def rotate(self) -> None:
        """A new KEK version; the old one still decrypts until rewrap."""
        if self.name == "local":
            self.previous_secret = self.secret
            self.secret = "rotated-kek-" + secrets.token_urlsafe(32)
        elif self.name == "vault-transit":
            assert self.bao is not None
            self.bao.root().secrets.transit.rotate_key(name=self.key)
        else:
            self.kms().rotate_key_on_demand(KeyId=self.kms_key_id)

    def retire_old_versions(self) -> None:
        """After rewrap: the old KEK is gone (local) or refused (min_decryption_version)."""
        if self.name == "local":
            self.previous_secret = None
        elif self.name == "vault-transit":
            assert self.bao is not None
            root = self.bao.root()
            latest = root.secrets.transit.read_key(name=self.key)["data"]["latest_version"]
            root.secrets.transit.update_key_configuration(
                name=self.key, min_decryption_version=latest
            )

    def deny(self) -> None:
        """The KEK stops answering: Vault policy without decrypt; KMS unreachable."""
        if self.name == "vault-transit":
            assert self.bao is not None
            self.bao.root().sys.create_or_update_policy(
                self.key, _policy("transit", self.key, decrypt=False)
            )
        else:
            assert self.moto is not None
            assert self.moto.pid is not None
            os.kill(self.moto.pid, signal.SIGSTOP)

    def allow(self) -> None:
        if self.name == "vault-transit":
            assert self.bao is not None
            self.bao.root().sys.create_or_update_policy(
                self.key, _policy("transit", self.key, decrypt=True)
            )
        else:
            assert self.moto is not None
            assert self.moto.pid is not None
            os.kill(self.moto.pid, signal.SIGCONT)

    def other(self) -> KekBackend:
        """A different KEK of the same provider (the wrong one for this bucket)."""
        other = KekBackend(self.name, bao=self.bao, moto=self.moto)
        if self.name == "local":
            other.secret = "wrong-kek-" + secrets.token_urlsafe(32)
        return other


def _aws() -> dict[str, str]:
    return {
        "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    }
