"""Key-encryption-key providers: where the KEK lives and how a record's data key is wrapped.

`KEK_PROVIDER` chooses one: `local` (HKDF from KEY_ENCRYPTION_SECRET, with _PREVIOUS),
`vault-transit` (HashiCorp Vault or OpenBao transit, a derived key whose `context` is the
record's identity) or `aws-kms` (GenerateDataKey/Decrypt/ReEncrypt with the identity as
EncryptionContext, so the KMS audit log names the record). Every wrapped key carries a
`kek_id` that names the provider, the key and its version, so rewrap knows what is stale.

The blocking clients (hvac, boto3) run in a worker thread, never on the event loop.

    KekError                  a KEK operation failed; never carries key bytes
    ├── KekUnavailableError   unreachable, or refused us (policy, disabled key, login):
    │                         fail closed now, works again when the provider does
    └── KekUnwrapError        the wrapped key did not open: wrong key or context, tampered,
                              or older than `min_decryption_version` (also an EnvelopeError)
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.crypto import EnvelopeError, KekRing, UnknownKekError

__all__ = [
    "AwsKmsKek",
    "DataKeyCache",
    "KekError",
    "KekProvider",
    "KekUnavailableError",
    "KekUnwrapError",
    "LocalKek",
    "VaultTransitKek",
    "WrapContext",
    "WrappedKey",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_DATA_KEY_BITS = 256


class KekError(Exception):
    def __init__(self, provider: str, reason: str) -> None:
        self.provider = provider
        self.reason = reason
        super().__init__(f"{provider}: {reason}")


class KekUnavailableError(KekError):
    """The provider did not answer, or refused to (permission, disabled key)."""


class KekUnwrapError(KekError, EnvelopeError):
    """The provider answered that this wrapped key does not open."""


@dataclass(frozen=True)
class WrapContext:
    """What a data key is bound to: AAD bytes (local, Vault context) and a KMS context."""

    aad: bytes
    fields: Mapping[str, str]

    @property
    def b64(self) -> str:
        return base64.b64encode(self.aad).decode()


@dataclass(frozen=True)
class WrappedKey:
    kek_id: str
    blob: bytes

    def __repr__(self) -> str:
        return f"WrappedKey({self.kek_id}, {len(self.blob)} bytes)"


class KekProvider(ABC):
    """One source of KEKs. `owns` says whether a `kek_id` was made by this provider."""

    name: str

    @abstractmethod
    def owns(self, kek_id: str) -> bool: ...

    @abstractmethod
    async def current_kek_id(self) -> str:
        """The id new wraps get now; a record with another id is due for rewrap."""

    @abstractmethod
    async def wrap(self, data_key: bytes, context: WrapContext) -> WrappedKey: ...

    @abstractmethod
    async def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes: ...

    async def new_data_key(self, context: WrapContext) -> tuple[bytes, WrappedKey]:
        data_key = AESGCM.generate_key(bit_length=_DATA_KEY_BITS)
        return data_key, await self.wrap(data_key, context)

    async def rewrap(self, wrapped: WrappedKey, context: WrapContext) -> WrappedKey:
        """Under the current version; remote providers do it without the data key leaving them."""
        return await self.wrap(await self.unwrap(wrapped, context), context)

    async def describe(self) -> dict[str, str]:
        """What `keyveil keys doctor` shows: never a secret."""
        return {"provider": self.name, "current": await self.current_kek_id()}

    def close(self) -> None:  # noqa: B027 - most providers hold nothing to release
        """Release pooled connections."""


# --- local ------------------------------------------------------------------------------


class LocalKek(KekProvider):
    """HKDF from KEY_ENCRYPTION_SECRET (and _PREVIOUS): the development default."""

    name = "local"

    def __init__(self, ring: KekRing) -> None:
        self.ring = ring

    def owns(self, kek_id: str) -> bool:
        return kek_id in self.ring

    async def current_kek_id(self) -> str:
        return self.ring.current.kek_id

    async def wrap(self, data_key: bytes, context: WrapContext) -> WrappedKey:
        kek = self.ring.current
        return WrappedKey(kek.kek_id, kek.wrap(data_key, context.aad))

    async def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes:
        # UnknownKekError and IntegrityError are EnvelopeErrors already.
        return self.ring.get(wrapped.kek_id).unwrap(wrapped.blob, context.aad)


# --- remote helpers ---------------------------------------------------------------------


class _BlockingCalls:
    """The provider's own small thread pool for its blocking client (hvac, boto3).

    Not the loop's default executor: while Vault or KMS hangs, each call holds a thread
    until the client's own timeout, and in the shared pool those would starve everything
    else that runs in threads (the JWKS fetches, other providers' calls).
    """

    def __init__(self, name: str, max_workers: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)

    async def run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- Vault / OpenBao transit ------------------------------------------------------------


@dataclass(frozen=True)
class VaultAuth:
    """Exactly one of: a token, an AppRole pair, a Kubernetes role (service-account JWT)."""

    token: str | None = None
    role_id: str | None = None
    secret_id: str | None = None
    k8s_role: str | None = None
    k8s_token_path: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    approle_mount: str = "approle"
    k8s_mount: str = "kubernetes"

    @property
    def method(self) -> str:
        if self.role_id:
            return "approle"
        if self.k8s_role:
            return "kubernetes"
        return "token"


class VaultTransitKek(KekProvider):
    """A derived transit key: `context` = the record's identity, on encrypt, decrypt, rewrap."""

    name = "vault-transit"

    def __init__(
        self,
        *,
        addr: str,
        key: str,
        mount: str,
        auth: VaultAuth,
        timeout_s: float,
        verify: str | bool = True,
    ) -> None:
        import hvac

        self._key = key
        self._mount = mount
        self._auth = auth
        self._client = hvac.Client(url=addr, timeout=timeout_s, verify=verify)
        self._calls = _BlockingCalls("kek-vault")
        self._logged_in = auth.method == "token"
        if auth.token:
            self._client.token = auth.token
        self._prefix = f"vault-transit:{mount}/{key}:"
        # Vault ignores `context` on a key that is not derived: check before the first wrap.
        self._derived_checked = False

    def owns(self, kek_id: str) -> bool:
        return kek_id.startswith(self._prefix)

    def _kek_id(self, ciphertext: str) -> str:
        # "vault:v3:..." -> "vault-transit:transit/keyveil:v3"
        parts = ciphertext.split(":", 2)
        version = parts[1] if len(parts) == 3 else "v?"
        return self._prefix + version

    def _login(self) -> None:
        auth = self._auth
        if auth.method == "approle":
            self._client.auth.approle.login(
                role_id=auth.role_id, secret_id=auth.secret_id, mount_point=auth.approle_mount
            )
        elif auth.method == "kubernetes":
            jwt = auth.k8s_token_path.read_text().strip()
            self._client.auth.kubernetes.login(auth.k8s_role, jwt, mount_point=auth.k8s_mount)
        self._logged_in = True

    def _call(self, operation: Callable[[], T]) -> T:
        """Run one transit call, logging in first (and once more if the login expired)."""
        import hvac.exceptions
        import requests

        for attempt in range(2):
            try:
                if not self._logged_in:
                    self._login()
                return operation()
            except hvac.exceptions.Forbidden:
                if attempt == 0 and self._auth.method != "token":
                    self._logged_in = False  # a lapsed login looks like a denial: log in again
                    continue
                raise KekUnavailableError(self.name, "permission denied by Vault policy") from None
            except hvac.exceptions.InvalidRequest as exc:
                raise KekUnwrapError(self.name, _vault_reason(exc)) from None
            except hvac.exceptions.InvalidPath:
                raise KekUnavailableError(
                    self.name, f"no transit key {self._key} at mount {self._mount}"
                ) from None
            except hvac.exceptions.VaultError as exc:
                raise KekUnavailableError(self.name, f"Vault error {type(exc).__name__}") from None
            except (requests.RequestException, OSError) as exc:
                raise KekUnavailableError(
                    self.name, f"unreachable ({type(exc).__name__})"
                ) from None
        raise KekUnavailableError(self.name, "permission denied by Vault policy")

    def _read_key(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            reply = self._client.secrets.transit.read_key(name=self._key, mount_point=self._mount)
            data: dict[str, Any] = reply["data"]
            return data

        data = self._call(read)
        if not data.get("derived"):
            raise KekUnavailableError(
                self.name,
                f"transit key {self._key} is not derived (create it with derived=true), "
                "so the record identity could not be bound as context",
            )
        self._derived_checked = True
        return data

    def _bound(self, operation: Callable[[], T]) -> T:
        """`operation`, once the key is known to bind `context` (derived)."""
        if not self._derived_checked:
            self._read_key()
        return self._call(operation)

    async def current_kek_id(self) -> str:
        data = await self._calls.run(self._read_key)
        return f"{self._prefix}v{data['latest_version']}"

    async def describe(self) -> dict[str, str]:
        data = await self._calls.run(self._read_key)
        return {
            "provider": self.name,
            "current": f"{self._prefix}v{data['latest_version']}",
            "min_decryption_version": str(data.get("min_decryption_version", 1)),
            "auth": self._auth.method,
        }

    async def wrap(self, data_key: bytes, context: WrapContext) -> WrappedKey:
        def encrypt() -> str:
            reply = self._client.secrets.transit.encrypt_data(
                name=self._key,
                plaintext=base64.b64encode(data_key).decode(),
                context=context.b64,
                mount_point=self._mount,
            )
            text: str = reply["data"]["ciphertext"]
            return text

        ciphertext = await self._calls.run(lambda: self._bound(encrypt))
        return WrappedKey(self._kek_id(ciphertext), ciphertext.encode())

    async def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes:
        if not self.owns(wrapped.kek_id):
            raise UnknownKekError(wrapped.kek_id)

        def decrypt() -> bytes:
            reply = self._client.secrets.transit.decrypt_data(
                name=self._key,
                ciphertext=wrapped.blob.decode(),
                context=context.b64,
                mount_point=self._mount,
            )
            return base64.b64decode(reply["data"]["plaintext"])

        return await self._calls.run(lambda: self._bound(decrypt))

    async def rewrap(self, wrapped: WrappedKey, context: WrapContext) -> WrappedKey:
        if not self.owns(wrapped.kek_id):
            return await super().rewrap(wrapped, context)

        def rewrap() -> str:
            reply = self._client.secrets.transit.rewrap_data(
                name=self._key,
                ciphertext=wrapped.blob.decode(),
                context=context.b64,
                mount_point=self._mount,
            )
            text: str = reply["data"]["ciphertext"]
            return text

        ciphertext = await self._calls.run(lambda: self._bound(rewrap))
        return WrappedKey(self._kek_id(ciphertext), ciphertext.encode())

    def close(self) -> None:
        self._calls.close()
        self._client.adapter.close()


def _vault_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "too old" in text or "disallowed by policy" in text:
        return "wrapped under a key version below min_decryption_version"
    if "authentication failed" in text:
        return "authentication failed (wrong context or tampered wrapped key)"
    if "invalid ciphertext" in text or "invalid" in text:
        return "malformed wrapped key"
    return "decryption refused"


# --- AWS KMS ----------------------------------------------------------------------------


class AwsKmsKek(KekProvider):
    """A KMS symmetric key; the version is the key's rotation count (ListKeyRotations)."""

    name = "aws-kms"

    def __init__(
        self,
        *,
        key_id: str,
        region: str | None,
        endpoint_url: str | None,
        timeout_s: float,
    ) -> None:
        import boto3
        from botocore.config import Config

        self._key_id = key_id
        self._calls = _BlockingCalls("kek-kms")
        self._client: Any = boto3.session.Session().client(
            "kms",
            region_name=region,
            endpoint_url=endpoint_url,
            config=Config(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )
        self._arn: str | None = None

    def owns(self, kek_id: str) -> bool:
        if not kek_id.startswith("aws-kms:"):
            return False
        arn = kek_id.removeprefix("aws-kms:").split("#", 1)[0]
        return self._arn is None or _key_part(arn) == _key_part(self._arn)

    def _call(self, operation: Callable[[], T]) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return operation()
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "ClientError"))
            if code in ("InvalidCiphertextException", "IncorrectKeyException"):
                raise KekUnwrapError(
                    self.name, "authentication failed (wrong context or tampered wrapped key)"
                ) from None
            raise KekUnavailableError(self.name, f"KMS refused: {code}") from None
        except BotoCoreError as exc:
            raise KekUnavailableError(self.name, f"unreachable ({type(exc).__name__})") from None

    def _version(self) -> str:
        arn = self._resolve()
        rotations = self._client.list_key_rotations(KeyId=arn).get("Rotations", [])
        return f"aws-kms:{arn}#r{len(rotations)}"

    async def current_kek_id(self) -> str:
        return await self._calls.run(lambda: self._call(self._version))

    async def describe(self) -> dict[str, str]:
        def state() -> dict[str, str]:
            current = self._version()
            meta = self._client.describe_key(KeyId=self._key_id)["KeyMetadata"]
            return {"provider": self.name, "current": current, "key_state": str(meta["KeyState"])}

        return await self._calls.run(lambda: self._call(state))

    async def new_data_key(self, context: WrapContext) -> tuple[bytes, WrappedKey]:
        def generate() -> tuple[bytes, WrappedKey]:
            kek_id = self._version()
            reply = self._client.generate_data_key(
                KeyId=self._key_id, KeySpec="AES_256", EncryptionContext=dict(context.fields)
            )
            return bytes(reply["Plaintext"]), WrappedKey(kek_id, bytes(reply["CiphertextBlob"]))

        return await self._calls.run(lambda: self._call(generate))

    async def wrap(self, data_key: bytes, context: WrapContext) -> WrappedKey:
        def encrypt() -> WrappedKey:
            kek_id = self._version()
            reply = self._client.encrypt(
                KeyId=self._key_id, Plaintext=data_key, EncryptionContext=dict(context.fields)
            )
            return WrappedKey(kek_id, bytes(reply["CiphertextBlob"]))

        return await self._calls.run(lambda: self._call(encrypt))

    def _resolve(self) -> str:
        if self._arn is None:
            described = self._client.describe_key(KeyId=self._key_id)
            self._arn = str(described["KeyMetadata"]["Arn"])
        return self._arn

    async def unwrap(self, wrapped: WrappedKey, context: WrapContext) -> bytes:
        if not wrapped.kek_id.startswith("aws-kms:"):
            raise UnknownKekError(wrapped.kek_id)
        arn = wrapped.kek_id.removeprefix("aws-kms:").split("#", 1)[0]

        def decrypt() -> bytes:
            # Only the configured key: a ciphertext of another key is not ours to open,
            # whatever the IAM policy would allow. Compared by key id, so a multi-Region
            # replica (same `mrk-` id, another region's ARN) opens its primary's records.
            configured = self._resolve()
            if _key_part(arn) != _key_part(configured):
                raise UnknownKekError(wrapped.kek_id)
            reply = self._client.decrypt(
                CiphertextBlob=wrapped.blob,
                KeyId=configured,
                EncryptionContext=dict(context.fields),
            )
            return bytes(reply["Plaintext"])

        return await self._calls.run(lambda: self._call(decrypt))

    async def rewrap(self, wrapped: WrappedKey, context: WrapContext) -> WrappedKey:
        if not wrapped.kek_id.startswith("aws-kms:"):
            return await super().rewrap(wrapped, context)

        def reencrypt() -> WrappedKey:
            kek_id = self._version()
            reply = self._client.re_encrypt(
                CiphertextBlob=wrapped.blob,
                SourceEncryptionContext=dict(context.fields),
                DestinationKeyId=self._key_id,
                DestinationEncryptionContext=dict(context.fields),
            )
            return WrappedKey(kek_id, bytes(reply["CiphertextBlob"]))

        return await self._calls.run(lambda: self._call(reencrypt))

    def close(self) -> None:
        self._calls.close()
        self._client.close()


def _key_part(arn: str) -> str:
    """`arn:aws:kms:<region>:<account>:key/<id>` -> `<id>` (a replica shares it)."""
    return arn.rsplit("/", 1)[-1]


# --- the in-memory cache of unwrapped data keys -----------------------------------------


class DataKeyCache:
    """Unwrapped data keys, in memory only, for at most `ttl_s` after the unwrap.

    The age counts from the unwrap, never from the last use, so a KEK revoked in the
    provider stops serving within one TTL however busy the key is.
    """

    def __init__(
        self, *, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, bytes, bytes], tuple[float, bytes]] = OrderedDict()

    def get(self, wrapped: WrappedKey, context: WrapContext) -> bytes | None:
        slot = (wrapped.kek_id, wrapped.blob, context.aad)
        found = self._entries.get(slot)
        if found is None:
            return None
        expires, data_key = found
        if expires <= self._clock():
            del self._entries[slot]
            return None
        self._entries.move_to_end(slot)
        return data_key

    def put(self, wrapped: WrappedKey, context: WrapContext, data_key: bytes) -> None:
        if self._ttl <= 0 or self._max <= 0:
            return
        slot = (wrapped.kek_id, wrapped.blob, context.aad)
        self._entries[slot] = (self._clock() + self._ttl, data_key)
        self._entries.move_to_end(slot)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
