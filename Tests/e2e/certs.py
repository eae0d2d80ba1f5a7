"""Test certificates made with the `openssl` command line (Tests/e2e/test_edge.py): a CA, server
certificates for 127.0.0.1 and localhost (subjectAltName), an expired one, one for another host,
client certificates, and a second CA that signs a client certificate the server must not trust.

    pki = Pki(tmp_dir)
    ca = pki.ca("edge-ca")
    leaf = pki.server(ca, "server", serial=0x1001)     # leaf.cert, leaf.key (PEM files)
    pki.server(ca, "expired", serial=0x1002, expired=True)
    pki.server(ca, "wrong", serial=0x1003, hosts=("wrong.example", "10.255.255.1"))
    pki.client(ca, "client", serial=0x2001)

Everything is RSA 2048 and SHA-256, the most ordinary certificates there are.
"""

from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = "openssl"


@dataclass(frozen=True)
class CertFiles:
    name: str
    cert: Path  # PEM certificate
    key: Path   # PEM private key (unencrypted)
    serial: int

    def read(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run([OPENSSL, *args], cwd=str(cwd), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def _san(hosts) -> str:
    entries = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            entries.append(f"IP:{host}")
        except ValueError:
            entries.append(f"DNS:{host}")
    return ",".join(entries)


def serial_of(cert: Path) -> int:
    done = subprocess.run([OPENSSL, "x509", "-in", str(cert), "-noout", "-serial"], capture_output=True, text=True, check=True)
    return int(done.stdout.strip().split("=", 1)[1], 16)


class Pki:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def ca(self, name: str, subject: str | None = None) -> CertFiles:
        key, cert = self.dir / f"{name}.key", self.dir / f"{name}.crt"
        _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "3650",
             "-keyout", key.name, "-out", cert.name, "-subj", subject or f"/CN=Sidecar e2e {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=self.dir)
        return CertFiles(name, cert, key, serial_of(cert))

    def _leaf(self, ca: CertFiles, name: str, serial: int, subject: str, extensions: str, expired: bool) -> CertFiles:
        key, csr, cert, ext = (self.dir / f"{name}{suffix}" for suffix in (".key", ".csr", ".crt", ".ext"))
        _run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-sha256", "-keyout", key.name, "-out", csr.name,
             "-subj", subject, cwd=self.dir)
        ext.write_text(extensions)
        if not expired:
            _run("x509", "-req", "-in", csr.name, "-CA", ca.cert.name, "-CAkey", ca.key.name, "-sha256",
                 "-set_serial", str(serial), "-days", "30", "-extfile", ext.name, "-out", cert.name, cwd=self.dir)
        else:
            # `openssl x509 -req` (OpenSSL 3.0) cannot date a certificate in the past; `openssl ca` can.
            db = self.dir / f"{name}.ca-db"
            db.mkdir(exist_ok=True)
            (db / "index.txt").write_text("")
            (db / "serial").write_text(f"{serial:X}".rjust(4, "0") + "\n")
            config = self.dir / f"{name}.ca.cnf"
            config.write_text(
                "[ca]\ndefault_ca = edge\n"
                "[edge]\n"
                f"dir = {db}\ndatabase = $dir/index.txt\nserial = $dir/serial\nnew_certs_dir = $dir\n"
                f"certificate = {ca.cert}\nprivate_key = {ca.key}\n"
                "default_md = sha256\npolicy = anything\nunique_subject = no\ncopy_extensions = none\n"
                "[anything]\ncommonName = supplied\n"
            )
            _run("ca", "-batch", "-notext", "-config", config.name, "-startdate", "20200101000000Z",
                 "-enddate", "20210101000000Z", "-extfile", ext.name, "-in", csr.name, "-out", cert.name, cwd=self.dir)
        return CertFiles(name, cert, key, serial_of(cert))

    def server(self, ca: CertFiles, name: str, serial: int, hosts=("127.0.0.1", "localhost"), expired: bool = False) -> CertFiles:
        extensions = (
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            f"subjectAltName={_san(hosts)}\n"
        )
        return self._leaf(ca, name, serial, f"/CN={hosts[0]}", extensions, expired)

    def client(self, ca: CertFiles, name: str, serial: int) -> CertFiles:
        extensions = (
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=clientAuth\n"
        )
        return self._leaf(ca, name, serial, f"/CN={name}", extensions, False)
