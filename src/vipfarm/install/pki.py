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
again only to add a node.
"""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vipfarm.datapath.spec import IPAddress

__all__ = ["CA_DAYS", "NODE_DAYS", "FarmPki", "PkiError", "make_farm_pki", "san_of"]

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


def make_farm_pki(
    farm: str, nodes: Sequence[tuple[str, Sequence[IPAddress]]], *, openssl: str | None = None
) -> FarmPki:
    """A new CA for `farm` and a certificate for each (node name, addresses)."""
    exe = openssl or shutil.which("openssl")
    if exe is None:
        raise PkiError(
            "the openssl command is needed to make the farm's certificates: apt-get install "
            "openssl (or use --no-tls for a plain-HTTP API)"
        )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    with tempfile.TemporaryDirectory(prefix="vipfarm-pki-") as tmp:
        d = Path(tmp)
        d.chmod(0o700)
        _openssl(
            [
                "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt",
                "-days", str(CA_DAYS), "-subj", f"/CN=vipfarm {farm} farm CA",
                "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            ],
            d,
            exe,
        )  # fmt: skip
        out: dict[str, tuple[bytes, bytes]] = {}
        for i, (name, addrs) in enumerate(nodes):
            ext = d / f"n{i}.ext"
            ext.write_text(
                f"subjectAltName={san_of(name, addrs)}\n"
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth,clientAuth\n"
            )
            _openssl(
                ["req", "-new", *ec, "-keyout", f"n{i}.key", "-out", f"n{i}.csr",
                 "-subj", f"/CN={name}"],
                d,
                exe,
            )  # fmt: skip
            _openssl(
                [
                    "x509", "-req", "-in", f"n{i}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-set_serial", str(secrets.randbits(63) | 1), "-days", str(NODE_DAYS),
                    "-extfile", ext.name, "-out", f"n{i}.crt",
                ],
                d,
                exe,
            )  # fmt: skip
            out[name] = ((d / f"n{i}.crt").read_bytes(), (d / f"n{i}.key").read_bytes())
        return FarmPki((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes(), out)
