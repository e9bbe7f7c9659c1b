"""A throwaway certificate authority for mutual-TLS tests, made with the openssl CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class Pki:
    """A CA in ``directory`` that issues P-256 certificates for servers and clients."""

    def __init__(self, directory: Path, name: str = "test-ca") -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = directory / f"{name}.crt"
        self.ca_key = directory / f"{name}.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(self.ca_key), "-out", str(self.ca), "-days", "2", "-subj", f"/CN={name}")

    def issue(self, name: str, cn: str, sans: str = "DNS:localhost,IP:127.0.0.1") -> tuple[Path, Path]:
        """A certificate with subject ``CN=cn`` (empty: no CN) and the given SANs; returns (cert, key)."""
        cert, key, csr, ext = (self.dir / f"{name}.{s}" for s in ("crt", "key", "csr", "ext"))
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
                 "-out", str(csr), "-subj", f"/CN={cn}" if cn else "/O=nobody")
        ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key),
                 "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
        return cert, key
