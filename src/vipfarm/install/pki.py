"""The farm's small certificate authority and one certificate per node, for the HTTPS API.

Theory of operation
-------------------
The nodes of a farm call each other's API by IP address (deployment, rejoin sync, the farm
view), and verify each other with the farm's own CA (`api.ca_file`), not the system's: a farm
CA that signs only its nodes is all the trust a farm needs, and no public CA issues
certificates for private addresses anyway. So `make_farm_pki` creates one self-signed CA
(ECDSA P-256, CA:TRUE with pathlen 0, ten years) and, per node, a key and a certificate whose
subjectAltName holds the node's name and every one of its addresses (serverAuth and
clientAuth, about two years: under the 825 days some TLS clients accept at most).

The keys and certificates are made by the `openssl` command, run in a private temporary
directory that is removed afterwards: the project's virtualenv has no `cryptography` package,
and openssl is on every Debian server (the Debian package depends on it). Everything is
returned as PEM bytes; the caller decides where they go. The CA's key is returned too: keep it
off the nodes (`vipfarm init` leaves it in the bundle's `ca/` directory only), it is needed
again only to add a node: `sign_node` signs a new node's certificate with it, with the same
extensions (`vipfarm init --add-node`).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vipfarm.datapath.spec import IPAddress

__all__ = [
    "CA_DAYS",
    "NODE_DAYS",
    "FarmPki",
    "PkiError",
    "make_farm_pki",
    "san_of",
    "sign_node",
]

CA_DAYS = 3650
NODE_DAYS = 800
_TIMEOUT_S = 60


class PkiError(RuntimeError):
    """openssl is missing or refused: the message says what to install or which call failed."""


@dataclass(frozen=True)
class FarmPki:
    ca_cert: bytes
    ca_key: bytes
    nodes: dict[str, tuple[bytes, bytes]]  # node name -> (certificate, key), PEM


def san_of(name: str, addresses: Sequence[IPAddress]) -> str:
    """The subjectAltName of a node: its name (DNS) and each of its addresses (IP)."""
    return ",".join([f"DNS:{name}", *(f"IP:{ipaddress.ip_address(a)}" for a in addresses)])


def _openssl(args: list[str], cwd: Path, openssl: str) -> None:
    try:
        proc = subprocess.run(
            [openssl, *args], cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PkiError(f"openssl {args[0]} failed: {exc}") from None
    if proc.returncode != 0:
        raise PkiError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()[-500:]}")


def _exe(openssl: str | None) -> str:
    exe = openssl or shutil.which("openssl")
    if exe is None:
        raise PkiError(
            "the openssl command is needed to make the farm's certificates: apt-get install "
            "openssl (or use --no-tls for a plain-HTTP API)"
        )
    return exe


_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _sign(
    d: Path, exe: str, tag: str, name: str, addrs: Sequence[IPAddress]
) -> tuple[bytes, bytes]:
    """A key and a certificate for node `name`, signed by d/ca.crt with d/ca.key."""
    ext = d / f"{tag}.ext"
    ext.write_text(
        f"subjectAltName={san_of(name, addrs)}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(
        [
            "req",
            "-new",
            *_EC,
            "-keyout",
            f"{tag}.key",
            "-out",
            f"{tag}.csr",
            "-subj",
            f"/CN={name}",
        ],
        d,
        exe,
    )
    _openssl(
        [
            "x509", "-req", "-in", f"{tag}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", str(secrets.randbits(63) | 1), "-days", str(NODE_DAYS),
            "-extfile", ext.name, "-out", f"{tag}.crt",
        ],
        d,
        exe,
    )  # fmt: skip
    return (d / f"{tag}.crt").read_bytes(), (d / f"{tag}.key").read_bytes()


def make_farm_pki(
    farm: str, nodes: Sequence[tuple[str, Sequence[IPAddress]]], *, openssl: str | None = None
) -> FarmPki:
    """A new CA for `farm` and a certificate for each (node name, addresses)."""
    exe = _exe(openssl)
    with tempfile.TemporaryDirectory(prefix="vipfarm-pki-") as tmp:
        d = Path(tmp)
        d.chmod(0o700)
        _openssl(
            [
                "req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.crt",
                "-days", str(CA_DAYS), "-subj", f"/CN=vipfarm {farm} farm CA",
                "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ],
            d,
            exe,
        )  # fmt: skip
        out = {name: _sign(d, exe, f"n{i}", name, addrs) for i, (name, addrs) in enumerate(nodes)}
        return FarmPki((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes(), out)


def sign_node(
    ca_cert: bytes,
    ca_key: bytes,
    name: str,
    addresses: Sequence[IPAddress],
    *,
    openssl: str | None = None,
) -> tuple[bytes, bytes]:
    """A certificate and key for a node added to a farm, signed by the farm's kept CA (PEM):
    the same extensions as the first nodes' (`make_farm_pki`). The CA must be the one whose
    certificate every node holds as `api.ca_file`, so that they trust the new node at once."""
    exe = _exe(openssl)
    with tempfile.TemporaryDirectory(prefix="vipfarm-pki-") as tmp:
        d = Path(tmp)
        d.chmod(0o700)
        (d / "ca.crt").write_bytes(ca_cert)
        fd = os.open(d / "ca.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(ca_key)
        # The key must be the certificate's: openssl x509 -req would sign with a wrong key and
        # every node would refuse the new node's certificate.
        try:
            _openssl(["x509", "-in", "ca.crt", "-noout", "-checkend", "0"], d, exe)
        except PkiError:
            raise PkiError("the farm CA's certificate has expired: make a new farm CA") from None
        pub_cert = subprocess.run(
            [exe, "x509", "-in", "ca.crt", "-noout", "-pubkey"], cwd=d, capture_output=True,
            timeout=_TIMEOUT_S,
        ).stdout  # fmt: skip
        pub_key = subprocess.run(
            [exe, "pkey", "-in", "ca.key", "-pubout"], cwd=d, capture_output=True,
            timeout=_TIMEOUT_S,
        ).stdout  # fmt: skip
        if not pub_cert or pub_cert != pub_key:
            raise PkiError("the CA's key does not belong to its certificate (ca/ was changed?)")
        return _sign(d, exe, "new", name, addresses)
