"""The server's edge, end to end, with real processes and stock clients: TLS, API keys, rate limits,
slow and idle clients, and bad configuration (issue 18).

- TLS (certificates made by the `openssl` command line, Tests/e2e/certs.py): curl --cacert,
  tritonclient.http (ssl=True) and tritonclient.grpc (ssl=True, root_certificates) on the HTTP,
  gRPC and admin listeners; an expired certificate and one for another host are refused by curl,
  Python's ssl and grpcio; mutual TLS (`tls.client_ca_file`): no client certificate or one from
  another CA fails the handshake, the right one works; SIGHUP swaps the certificate for new
  connections (a new serial) while a keep-alive connection opened before keeps working, and a
  reload of a broken file keeps the old certificate.
- API keys (`auth.keys_file`, SHA-256 hashes): none or wrong -> 401 (WWW-Authenticate: Bearer) /
  UNAUTHENTICATED, a key not allowed on the model -> 403 / PERMISSION_DENIED, `Authorization: Bearer`
  and `x-api-key`, over HTTP (OIP v2, KServe v1) and gRPC (unary and streaming); health, metadata
  and /metrics open by default, protected by `auth.open: []`; the keys file reloaded on SIGHUP;
  a key never in /metrics or the log; `sidecar keys hash`.
- Rate limits: a key's token bucket and a model's (`rate_limits`), driven faster than their rate
  for 5 s: the 200s are rate × duration + burst (±10 %), spread evenly, the rest 429 with
  Retry-After; gRPC RESOURCE_EXHAUSTED; sidecar_rate_limited_total counts every refusal by key name.
- Slow clients (`limits`: max_connections 2000, request_timeout_s 2, idle_timeout_s 3): a half sent
  body and a trickled head get 408 and are closed at request_timeout; idle keep-alive connections
  and silent ones are closed at idle_timeout, busy ones are not; an idle gRPC connection gets GOAWAY
  (raw HTTP/2, and a grpcio channel going IDLE), an open stream keeps its connection; 3000 slowloris
  connections from 3 processes (Tests/e2e/edge_attack.py) leave good clients served, and none is
  held past request_timeout. At the cap (a server of its own with max_connections 8) a newcomer
  closes the keep-alive connection idle the longest, and is refused when every one is busy.
- Bad configuration: a missing or unreadable keys file, certificate or key makes `sidecar serve
  --config` exit non-zero with a message naming the key.

Environment: SIDECAR_BIN, SIDECAR_CACHE_DIR (as for conftest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from certs import Pki, serial_of  # noqa: E402 - Tests/e2e is on the path (conftest's directory)
from conftest import CACHE_DIR, HERE, REPO, SIDECAR_BIN, Server, _free_port, running_server, wait_for  # noqa: E402

MODELS = HERE / "models"
ECHO = "edge_echo"
OTHER = "edge_other"
ATTACKER = HERE / "edge_attack.py"

# API keys (the secrets; the server only ever sees their SHA-256).
KEY = {
    "alice": "sk-e2e-alice-5f0c1e",   # ECHO only
    "bob": "sk-e2e-bob-77aa02",       # OTHER only
    "dave": "sk-e2e-dave-0b93d4",     # every model
    "carol": "sk-e2e-carol-c4b1e9",   # added by a reload
    "metered": "sk-e2e-metered-1d2f",  # rate 20/s, burst 5
}
WRONG_KEY = "sk-e2e-nobody-000000"


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_yaml(*entries: dict) -> str:
    return yaml.safe_dump({"keys": [dict(e, sha256=sha256(KEY[e["name"]])) for e in entries]}, sort_keys=False)


# ------------------------------------------------------------------------------------- helpers


class EdgeServer(Server):
    """A server started by `edge_server`: http(s) per its config, the context that trusts it."""

    scheme = "http"
    context: ssl.SSLContext | None = None
    admin_port: int | None = None
    config_path: Path | None = None

    @property
    def base(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    def log_since(self, offset: int) -> str:
        try:
            return self.log_path.read_bytes()[offset:].decode(errors="replace")
        except OSError as error:
            return f"(log unreadable: {error})"

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def _connection(port: int, scheme: str = "http", context: ssl.SSLContext | None = None, timeout: float = 10):
    if scheme == "https":
        return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def _exchange(conn, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
    all_headers = dict(headers or {})
    if body is not None:
        all_headers.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)


def call(srv: EdgeServer, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
         port: int | None = None, context: ssl.SSLContext | None = None, timeout: float = 10) -> Reply:
    """One request on a fresh connection (http.client: 4xx and 5xx are answers, not exceptions)."""
    conn = _connection(port or srv.http_port, srv.scheme, context or srv.context, timeout)
    try:
        return _exchange(conn, method, path, body, headers)
    finally:
        conn.close()


_SEQ = iter(range(1, 10**9))


def oip_body(values=None) -> tuple[bytes, list[float]]:
    a = next(_SEQ)
    values = values or [float(a), a + 0.5, a + 1.0, a + 1.5]
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, len(values)], "datatype": "FP32", "data": values}]})
    return body.encode(), values


def infer(srv: EdgeServer, model: str = ECHO, headers: dict | None = None, **kw) -> Reply:
    body, values = oip_body()
    reply = call(srv, "POST", f"/v2/models/{model}/infer", body, headers, **kw)
    if reply.status == 200:
        out = reply.json()["outputs"][0]
        assert out["data"] == values, f"{model}: wrong echo {reply.body[:300]!r} for {values}"
    return reply


def bearer(name: str) -> dict:
    return {"Authorization": f"Bearer {KEY[name]}"}


def x_api_key(name: str) -> dict:
    return {"x-api-key": KEY[name]}


def ca_context(ca_file: Path, client=None, alpn=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    if client is not None:
        context.load_cert_chain(str(client.cert), str(client.key))
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def unverified_context(alpn=None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def serial_or_error(port: int, context: ssl.SSLContext) -> int | str:
    try:
        return peer_serial(port, context)
    except (OSError, ssl.SSLError) as error:
        return f"{type(error).__name__}: {error}"


def peer_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate the server presents to a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    done = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=der, capture_output=True, check=True)
    return int(done.stdout.decode().strip().split("=", 1)[1], 16)


def curl(*args: str, timeout: float = 20) -> tuple[int, int | None, bytes, str]:
    """(curl's exit code, HTTP status or None, body, stderr)."""
    done = subprocess.run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
                          capture_output=True, timeout=timeout)
    out, _, code = done.stdout.rpartition(b"\n")
    status = int(code) if code.strip().isdigit() and int(code) != 0 else None
    return done.returncode, status, out, done.stderr.decode(errors="replace")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})?\s+(\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def grpc_input(values=None):
    a = next(_SEQ)
    data = np.array([values or [float(a), a + 0.5, a + 1.0, a + 1.5]], dtype=np.float32)
    inp = grpcclient.InferInput("x", list(data.shape), "FP32")
    inp.set_data_from_numpy(data)
    return inp, data


def grpc_code(fn) -> str:
    """'OK' or the gRPC status name (UNAUTHENTICATED, ...) of a tritonclient.grpc call."""
    try:
        fn()
        return "OK"
    except InferenceServerException as error:
        return (error.status() or "").replace("StatusCode.", "") + f" ({error.message()})"


def grpc_infer(client, model: str = ECHO, headers: dict | None = None):
    inp, data = grpc_input()
    result = client.infer(model, [inp], headers=headers, client_timeout=10)
    np.testing.assert_array_equal(result.as_numpy("x"), data)
    return result


def status_of(code_and_message: str) -> str:
    return code_and_message.split(" ", 1)[0]


@contextlib.contextmanager
def edge_server(directory: Path, config: dict, *, context: ssl.SSLContext | None = None,
                ready_headers: dict | None = None, admin_port: int | None = None, models=(ECHO, OTHER)):
    """`sidecar serve edge_echo edge_other --config DIRECTORY/server.yaml` (CONFIG), ready."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "server.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    scheme = "https" if "tls" in config else "http"

    def ready(srv) -> bool:
        conn = _connection(srv.http_port, scheme, context, timeout=2)
        try:
            return _exchange(conn, "GET", "/v2/health/ready", headers=ready_headers).status == 200
        except (OSError, http.client.HTTPException, ssl.SSLError):
            return False
        finally:
            conn.close()

    extra = ["--config", str(path)]
    if admin_port is not None:
        extra += ["--admin-port", str(admin_port)]
    with running_server([MODELS / m for m in models], extra, server_class=EdgeServer, prefix="sidecar-edge-",
                        ready=ready, admin=admin_port is not None) as srv:
        srv.scheme, srv.context, srv.admin_port, srv.config_path = scheme, context, admin_port, path
        yield srv


# ----------------------------------------------------------------------------------------- TLS

SERIAL = {"server": 0x1001, "expired": 0x1002, "wrong": 0x1003, "renewed": 0x1004, "client": 0x2001, "rogue": 0x3001}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = Pki(tmp_path_factory.mktemp("edge-pki"))
    ca = pki.ca("ca")
    rogue_ca = pki.ca("rogue-ca")
    return {
        "ca": ca,
        "server": pki.server(ca, "server", SERIAL["server"]),
        "expired": pki.server(ca, "expired", SERIAL["expired"], expired=True),
        "wrong": pki.server(ca, "wrong", SERIAL["wrong"], hosts=("wrong.example", "10.255.255.1")),
        "renewed": pki.server(ca, "renewed", SERIAL["renewed"]),
        "client": pki.client(ca, "client", SERIAL["client"]),
        "rogue": pki.client(rogue_ca, "rogue", SERIAL["rogue"]),
    }


def install_cert(directory: Path, files, stem: str = "server") -> None:
    """Copy a certificate and key to DIRECTORY/STEM.crt, STEM.key, each replaced in one rename."""
    directory.mkdir(parents=True, exist_ok=True)
    for source, target in ((files.cert, directory / f"{stem}.crt"), (files.key, directory / f"{stem}.key")):
        temporary = target.with_suffix(target.suffix + ".new")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    """TLS on all three listeners, the certificate named relative to the config file."""
    directory = tmp_path_factory.mktemp("edge-tls")
    install_cert(directory, pki["server"])
    config = {"tls": {"cert_file": "server.crt", "key_file": "server.key"}}
    with edge_server(directory, config, context=ca_context(pki["ca"].cert), admin_port=_free_port()) as srv:
        yield srv


def test_tls_curl_infer_and_health(tls_server, pki):
    ca = str(pki["ca"].cert)
    port = tls_server.http_port
    for url in (f"https://127.0.0.1:{port}/v2/health/ready", f"https://127.0.0.1:{port}/v2/health/live",
                f"https://localhost:{port}/v2/health/ready"):
        rc, status, body, err = curl("--cacert", ca, "--resolve", f"localhost:{port}:127.0.0.1", url)
        assert rc == 0 and status == 200, f"curl {url}: rc {rc}, status {status}, {err}\n{tls_server.log()}"
    body, values = oip_body()
    rc, status, out, err = curl("--cacert", ca, "-H", "Content-Type: application/json", "--data-binary", body.decode(),
                                f"https://127.0.0.1:{port}/v2/models/{ECHO}/infer")
    assert rc == 0 and status == 200, f"curl infer: rc {rc}, status {status}, {out[:300]!r} {err}"
    assert json.loads(out)["outputs"][0]["data"] == values
    rc, status, out, err = curl("--cacert", ca, "-d", '{"instances": [[1, 2], [3, 4]]}',
                                f"https://127.0.0.1:{port}/v1/models/{ECHO}:predict")
    assert rc == 0 and status == 200 and json.loads(out)["predictions"] == [[1, 2], [3, 4]], (rc, status, out, err)
    # The certificate served is the one configured.
    assert peer_serial(port, ca_context(pki["ca"].cert)) == SERIAL["server"]
    # Plain HTTP on the TLS port is not answered as if it were TLS.
    rc, status, out, err = curl(f"http://127.0.0.1:{port}/v2/health/ready")
    assert status != 200, f"plain HTTP on the TLS port answered 200: {out[:200]!r}"


def test_tls_tritonclient_http(tls_server, pki):
    client = httpclient.InferenceServerClient(tls_server.http_url, ssl=True, ssl_options={"ca_certs": str(pki["ca"].cert)})
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(ECHO)
        data = np.array([[1.5, 2.5, 3.5]], dtype=np.float32)
        inp = httpclient.InferInput("x", list(data.shape), "FP32")
        inp.set_data_from_numpy(data, binary_data=True)
        result = client.infer(ECHO, [inp], outputs=[httpclient.InferRequestedOutput("x", binary_data=True)])
        np.testing.assert_array_equal(result.as_numpy("x"), data)
        assert client.get_model_metadata(ECHO)["name"] == ECHO
    finally:
        client.close()
    # A client that trusts only the system CAs refuses this server's certificate.
    untrusting = httpclient.InferenceServerClient(tls_server.http_url, ssl=True)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusting.is_server_live()
    finally:
        untrusting.close()


def test_tls_tritonclient_grpc(tls_server, pki):
    client = grpcclient.InferenceServerClient(tls_server.grpc_url, ssl=True, root_certificates=str(pki["ca"].cert))
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(ECHO)
        grpc_infer(client)
        assert client.get_model_metadata(ECHO).name == ECHO
    finally:
        client.close()
    # Plain gRPC on the TLS port fails.
    plain = grpcclient.InferenceServerClient(tls_server.grpc_url)
    try:
        code = grpc_code(lambda: plain.is_server_live(client_timeout=5))
        assert status_of(code) in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), code
    finally:
        plain.close()
    # The gRPC listener presents the configured certificate (ALPN h2, as gRPC clients connect).
    assert peer_serial(tls_server.grpc_port, ca_context(pki["ca"].cert, alpn=["h2"])) == SERIAL["server"]


def test_tls_admin_listener(tls_server, pki):
    port = tls_server.admin_port
    rc, status, out, err = curl("--cacert", str(pki["ca"].cert), f"https://127.0.0.1:{port}/admin/v1/models")
    assert rc == 0 and status == 200, f"admin over TLS: rc {rc}, status {status}, {out[:300]!r} {err}\n{tls_server.log()}"
    assert ECHO in {m["name"] for m in json.loads(out)["models"]}
    assert peer_serial(port, ca_context(pki["ca"].cert)) == SERIAL["server"]
    rc, status, out, err = curl(f"http://127.0.0.1:{port}/admin/v1/models")
    assert status != 200, f"plain HTTP on the admin TLS port answered 200: {out[:200]!r}"


@pytest.mark.parametrize("which", ["expired", "wrong"])
def test_tls_bad_server_certificate_refused(which, pki, tmp_path):
    """A server with an expired certificate, or one for another host: every verifying client refuses it."""
    install_cert(tmp_path, pki[which])
    config = {"tls": {"cert_file": str(tmp_path / "server.crt"), "key_file": str(tmp_path / "server.key")}}
    with edge_server(tmp_path, config, context=unverified_context()) as srv:
        port = srv.http_port
        assert peer_serial(port, unverified_context()) == SERIAL[which]
        rc, status, out, err = curl("--cacert", str(pki["ca"].cert), f"https://127.0.0.1:{port}/v2/health/ready")
        assert rc == 60 and status is None, f"curl accepted the {which} certificate: rc {rc}, status {status}, {err}"
        expected = "expired" if which == "expired" else "no alternative certificate subject name matches"
        assert expected in err, err
        # -k (no verification) reaches the same server: the refusal is the certificate's.
        rc, status, _, err = curl("-k", f"https://127.0.0.1:{port}/v2/health/ready")
        assert rc == 0 and status == 200, (rc, status, err)
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            peer_serial(port, ca_context(pki["ca"].cert))
        assert ("expired" if which == "expired" else "mismatch") in str(caught.value), caught.value
        client = grpcclient.InferenceServerClient(srv.grpc_url, ssl=True, root_certificates=str(pki["ca"].cert))
        try:
            code = grpc_code(lambda: client.is_server_live(client_timeout=5))
            assert status_of(code) in ("UNAVAILABLE", "DEADLINE_EXCEEDED"), code
        finally:
            client.close()


def test_mutual_tls(pki, tmp_path):
    install_cert(tmp_path, pki["server"])
    config = {"tls": {"cert_file": "server.crt", "key_file": "server.key", "client_ca_file": str(pki["ca"].cert)}}
    ca, client, rogue = pki["ca"], pki["client"], pki["rogue"]
    with edge_server(tmp_path, config, context=ca_context(ca.cert, client)) as srv:
        url = f"https://127.0.0.1:{srv.http_port}/v2/models/{ECHO}/infer"
        body, values = oip_body()
        data = ["-H", "Content-Type: application/json", "--data-binary", body.decode()]
        rc, status, out, err = curl("--cacert", str(ca.cert), "--cert", str(client.cert), "--key", str(client.key), *data, url)
        assert rc == 0 and status == 200 and json.loads(out)["outputs"][0]["data"] == values, (rc, status, out, err)
        rc, status, out, err = curl("--cacert", str(ca.cert), *data, url)
        assert rc != 0 and status is None, f"no client certificate, yet: rc {rc}, status {status}, {out[:200]!r}"
        rc, status, out, err = curl("--cacert", str(ca.cert), "--cert", str(rogue.cert), "--key", str(rogue.key), *data, url)
        assert rc != 0 and status is None, f"a client certificate from another CA, yet: rc {rc}, status {status}, {out[:200]!r}"
        # Python's ssl: without a certificate the handshake (TLS 1.3: the first read) fails.
        for context in (ca_context(ca.cert), ca_context(ca.cert, rogue)):
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
                infer(srv, context=context)
        assert infer(srv).status == 200
        # tritonclient.http with a client certificate.
        hc = httpclient.InferenceServerClient(srv.http_url, ssl=True, ssl_options={
            "ca_certs": str(ca.cert), "certfile": str(client.cert), "keyfile": str(client.key)})
        try:
            assert hc.is_server_ready()
        finally:
            hc.close()
        # gRPC: the same.
        good = grpcclient.InferenceServerClient(srv.grpc_url, ssl=True, root_certificates=str(ca.cert),
                                                private_key=str(client.key), certificate_chain=str(client.cert))
        without = grpcclient.InferenceServerClient(srv.grpc_url, ssl=True, root_certificates=str(ca.cert))
        other = grpcclient.InferenceServerClient(srv.grpc_url, ssl=True, root_certificates=str(ca.cert),
                                                 private_key=str(rogue.key), certificate_chain=str(rogue.cert))
        try:
            grpc_infer(good)
            for refused in (without, other):
                code = grpc_code(lambda: grpc_infer(refused))
                assert status_of(code) == "UNAVAILABLE", code
        finally:
            good.close(), without.close(), other.close()


def test_sighup_reloads_certificate_keeping_open_connections(pki, tmp_path):
    install_cert(tmp_path, pki["server"])
    config = {"tls": {"cert_file": "server.crt", "key_file": "server.key"}}
    ca = pki["ca"]
    with edge_server(tmp_path, config, context=ca_context(ca.cert), admin_port=_free_port()) as srv:
        ports = {"http": (srv.http_port, None), "grpc": (srv.grpc_port, ["h2"]), "admin": (srv.admin_port, None)}
        for name, (port, alpn) in ports.items():
            assert peer_serial(port, ca_context(ca.cert, alpn=alpn)) == SERIAL["server"], name
        kept = _connection(srv.http_port, "https", ca_context(ca.cert))
        assert _exchange(kept, "GET", "/v2/health/ready").status == 200
        kept_socket = kept.sock
        assert int(kept_socket.getpeercert()["serialNumber"], 16) == SERIAL["server"]
        channel_client = grpcclient.InferenceServerClient(srv.grpc_url, ssl=True, root_certificates=str(ca.cert))
        grpc_infer(channel_client)

        install_cert(tmp_path, pki["renewed"])
        srv.process.send_signal(signal.SIGHUP)
        for name, (port, alpn) in ports.items():
            seen = wait_for(lambda: serial_or_error(port, ca_context(ca.cert, alpn=alpn)) == SERIAL["renewed"], 10)
            assert seen, f"{name}: new connections get {serial_or_error(port, ca_context(ca.cert, alpn=alpn))!r} 10 s after " \
                         f"SIGHUP (expected serial {SERIAL['renewed']}); server exit code {srv.process.poll()}\n{srv.log()}"
        assert srv.process.poll() is None, f"SIGHUP ended the server\n{srv.log()}"

        # The connection opened before the reload is the same socket, still answering.
        body, values = oip_body()
        reply = _exchange(kept, "POST", f"/v2/models/{ECHO}/infer", body)
        assert reply.status == 200 and reply.json()["outputs"][0]["data"] == values, reply
        assert kept.sock is kept_socket, "the keep-alive connection was closed by the reload"
        assert int(kept.sock.getpeercert()["serialNumber"], 16) == SERIAL["server"]
        kept.close()
        grpc_infer(channel_client)
        channel_client.close()
        assert infer(srv).status == 200

        # A reload that fails (the certificate file is garbage) keeps the certificate in use, and says so.
        before = srv.log_size()
        (tmp_path / "server.crt").write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        srv.process.send_signal(signal.SIGHUP)
        logged = wait_for(lambda: srv.log_since(before).strip(), 10)
        assert srv.process.poll() is None, f"a failed reload ended the server\n{srv.log()}"
        assert peer_serial(srv.http_port, ca_context(ca.cert)) == SERIAL["renewed"]
        assert infer(srv).status == 200
        assert logged and ("cert" in logged.lower() or "tls" in logged.lower()), \
            f"no log line about the failed certificate reload; log since SIGHUP: {logged!r}"
        install_cert(tmp_path, pki["renewed"])


# ------------------------------------------------------------------------------------ API keys


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("edge-auth")
    (directory / "keys.yaml").write_text(keys_yaml(
        {"name": "alice", "models": [ECHO]}, {"name": "bob", "models": [OTHER]}, {"name": "dave"}))
    with edge_server(directory, {"auth": {"keys_file": "keys.yaml"}}) as srv:
        yield srv


def assert_refused(reply: Reply, status: int, what: str, srv: EdgeServer) -> None:
    assert reply.status == status, f"{what}: expected {status}, got {reply.status} {reply.body[:300]!r}\n{srv.log()}"
    assert isinstance(reply.json().get("error"), str) and reply.json()["error"], f"{what}: body {reply.body[:300]!r}"
    if status == 401:
        assert reply.headers.get("www-authenticate", "").startswith("Bearer"), f"{what}: headers {reply.headers}"


def test_http_api_keys(auth_server):
    srv = auth_server
    before = call(srv, "GET", "/metrics").body.decode()
    assert_refused(infer(srv), 401, "no key", srv)
    assert_refused(infer(srv, headers={"Authorization": f"Bearer {WRONG_KEY}"}), 401, "wrong bearer key", srv)
    assert_refused(infer(srv, headers={"x-api-key": WRONG_KEY}), 401, "wrong x-api-key", srv)
    assert_refused(infer(srv, headers={"Authorization": "Bearer "}), 401, "empty bearer", srv)
    assert infer(srv, headers=bearer("alice")).status == 200
    assert infer(srv, headers=x_api_key("alice")).status == 200
    assert_refused(infer(srv, OTHER, headers=bearer("alice")), 403, "alice on edge_other", srv)
    assert_refused(infer(srv, OTHER, headers=x_api_key("alice")), 403, "alice on edge_other (x-api-key)", srv)
    assert infer(srv, OTHER, headers=bearer("bob")).status == 200
    assert_refused(infer(srv, ECHO, headers=x_api_key("bob")), 403, "bob on edge_echo", srv)
    for model in (ECHO, OTHER):
        assert infer(srv, model, headers=bearer("dave")).status == 200
    # KServe v1 is inference too.
    v1 = json.dumps({"instances": [[1, 2]]}).encode()
    assert_refused(call(srv, "POST", f"/v1/models/{ECHO}:predict", v1), 401, "KServe v1 without a key", srv)
    reply = call(srv, "POST", f"/v1/models/{ECHO}:predict", v1, bearer("alice"))
    assert reply.status == 200 and reply.json()["predictions"] == [[1, 2]], reply
    assert_refused(call(srv, "POST", f"/v1/models/{OTHER}:predict", v1, bearer("alice")), 403, "KServe v1 alice on other", srv)

    after = call(srv, "GET", "/metrics").body.decode()
    for secret in KEY.values():
        assert secret not in after, "a key appears in /metrics"
        assert secret not in srv.log(), "a key appears in the server log"
    grew = {reason: metric(after, "sidecar_auth_refused_total", reason=reason) - metric(before, "sidecar_auth_refused_total", reason=reason)
            for reason in ("missing", "wrong", "forbidden")}
    # missing: no key (OIP, v1), "Bearer " with nothing; wrong: two; forbidden: four (the empty bearer may count as either).
    assert grew["missing"] >= 2 and grew["wrong"] >= 2 and grew["missing"] + grew["wrong"] == 5 and grew["forbidden"] == 4, \
        f"sidecar_auth_refused_total grew by {grew}\n" + "\n".join(l for l in after.splitlines() if "auth_refused" in l)


def test_health_and_metadata_open_by_default(auth_server):
    srv = auth_server
    problems = []
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", f"/v2/models/{ECHO}",
                 f"/v2/models/{ECHO}/ready", f"/v2/models/{ECHO}/versions/1", "/status", f"/status/{ECHO}", "/metrics"):
        reply = call(srv, "GET", path)
        if reply.status != 200:
            problems.append(f"GET {path} without a key: {reply.status} {reply.body[:200]!r}")
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        for what, fn in (("ServerLive", client.is_server_live), ("ServerReady", client.is_server_ready),
                         ("ModelReady", lambda: client.is_model_ready(ECHO)), ("ServerMetadata", client.get_server_metadata),
                         ("ModelMetadata", lambda: client.get_model_metadata(ECHO))):
            code = grpc_code(fn)
            if code != "OK":
                problems.append(f"gRPC {what} without a key: {code}")
    finally:
        client.close()
    with grpc.insecure_channel(srv.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", ECHO):
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                if status != health_pb2.HealthCheckResponse.SERVING:
                    problems.append(f"grpc.health.v1 Check({service!r}) without a key: status {status}")
            except grpc.RpcError as error:
                problems.append(f"grpc.health.v1 Check({service!r}) without a key: {error.code()} {error.details()}")
    assert not problems, "\n".join(problems)


def test_grpc_api_keys(auth_server):
    client = grpcclient.InferenceServerClient(auth_server.grpc_url)
    try:
        cases = [
            (ECHO, None, "UNAUTHENTICATED"),
            (ECHO, {"authorization": f"Bearer {WRONG_KEY}"}, "UNAUTHENTICATED"),
            (ECHO, {"x-api-key": WRONG_KEY}, "UNAUTHENTICATED"),
            (ECHO, {"authorization": f"Bearer {KEY['alice']}"}, "OK"),
            (ECHO, {"x-api-key": KEY["alice"]}, "OK"),
            (OTHER, {"authorization": f"Bearer {KEY['alice']}"}, "PERMISSION_DENIED"),
            (OTHER, {"x-api-key": KEY["bob"]}, "OK"),
            (ECHO, {"x-api-key": KEY["bob"]}, "PERMISSION_DENIED"),
        ]
        got = [(model, headers, grpc_code(lambda: grpc_infer(client, model, headers))) for model, headers, _ in cases]
        wrong = [(c, g) for c, g in zip(cases, got) if status_of(g[2]) != c[2]]
        assert not wrong, f"gRPC answers differing (expected, got): {wrong}"
    finally:
        client.close()

    # ModelStreamInfer: the key comes with the stream's metadata.
    def stream(headers):
        ((result, error, data),) = stream_infer(auth_server.grpc_url, headers=headers)
        if error is not None:
            return status_of(error.status().replace("StatusCode.", "") + " ")
        np.testing.assert_array_equal(result.as_numpy("x"), data)
        return "OK"
    assert stream(None) == "UNAUTHENTICATED"
    assert stream({"authorization": f"Bearer {KEY['alice']}"}) == "OK"


def stream_infer(url: str, messages: int = 1, headers: dict | None = None, pause_s: float = 0.0) -> list:
    """`messages` ModelStreamInfer requests on one stream, `pause_s` apart, each awaited:
    [(result, error, the data sent)]. An error ends the stream (its answer is the last)."""
    results: list = []
    sent: list = []
    got = threading.Event()

    def callback(result, error):
        results.append((result, error))
        got.set()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback, headers=headers)
        for index in range(messages):
            if index:
                time.sleep(pause_s)
            got.clear()
            inp, data = grpc_input()
            sent.append(data)
            client.async_stream_infer(ECHO, [inp])
            assert got.wait(10), f"no answer to message {index + 1} on the stream"
            if results[-1][1] is not None:
                break
        client.stop_stream()
    finally:
        client.close()
    return [(result, error, data) for (result, error), data in zip(results, sent)]


def test_keys_hash_command():
    done = subprocess.run([SIDECAR_BIN, "keys", "hash"], input=KEY["alice"] + "\n", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == sha256(KEY["alice"]), (done.stdout, sha256(KEY["alice"]))


@pytest.mark.parametrize("open_", [[], ["health"]], ids=["open-none", "open-health"])
def test_auth_open_list(open_, tmp_path):
    (tmp_path / "keys.yaml").write_text(keys_yaml({"name": "dave"}, {"name": "alice", "models": [ECHO]}))
    config = {"auth": {"keys_file": "keys.yaml", "open": open_}}
    health_open = "health" in open_
    with edge_server(tmp_path, config, ready_headers=None if health_open else bearer("dave")) as srv:
        groups = {
            # A model's readiness is a probe, as gRPC ModelReady is: health.
            "health": ["/v2/health/live", "/v2/health/ready", f"/v2/models/{ECHO}/ready"],
            "metadata": ["/v2", f"/v2/models/{ECHO}", "/status"],
            "metrics": ["/metrics"],
        }
        problems = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        def refused(reply: Reply) -> bool:
            try:
                return reply.status == 401 and reply.headers.get("www-authenticate", "").startswith("Bearer") \
                    and bool(reply.json().get("error"))
            except ValueError:
                return False
        for group, paths in groups.items():
            for path in paths:
                without = call(srv, "GET", path)
                if group in open_:
                    check(without.status == 200, f"GET {path} (open) without a key: {without.status} {without.body[:200]!r}")
                else:
                    check(refused(without), f"GET {path} without a key: {without.status} {without.headers} {without.body[:200]!r}")
                    wrong = call(srv, "GET", path, headers={"x-api-key": WRONG_KEY})
                    check(refused(wrong), f"GET {path} with a wrong key: {wrong.status} {wrong.body[:200]!r}")
                    with_key = call(srv, "GET", path, headers=bearer("dave"))
                    check(with_key.status == 200, f"GET {path} with a key: {with_key.status} {with_key.body[:200]!r}")
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        dave = {"authorization": f"Bearer {KEY['dave']}"}
        try:
            for what, group, fn in (("ServerLive", "health", client.is_server_live),
                                    ("ModelReady", "health", lambda **kw: client.is_model_ready(ECHO, **kw)),
                                    ("ServerMetadata", "metadata", client.get_server_metadata),
                                    ("ModelMetadata", "metadata", lambda **kw: client.get_model_metadata(ECHO, **kw))):
                without = status_of(grpc_code(fn))
                expected = "OK" if group in open_ else "UNAUTHENTICATED"
                check(without == expected, f"gRPC {what} ({group}) without a key: {without}, expected {expected}")
                with_key = status_of(grpc_code(lambda: fn(headers=dave)))
                check(with_key == "OK", f"gRPC {what} with a key: {with_key}")
        finally:
            client.close()
        with grpc.insecure_channel(srv.grpc_url) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            for metadata in (None, (("authorization", f"Bearer {KEY['dave']}"),)):
                expected = "OK" if health_open or metadata else "UNAUTHENTICATED"
                try:
                    reply = health.Check(request, timeout=5, metadata=metadata)
                    got = "OK" if reply.status == health_pb2.HealthCheckResponse.SERVING else f"status {reply.status}"
                except grpc.RpcError as error:
                    got = error.code().name
                check(got == expected, f"grpc.health.v1 Check {'with' if metadata else 'without'} a key: {got}, expected {expected}")
        assert not problems, f"auth.open {open_}:\n" + "\n".join(problems)


def test_keys_file_reloaded_on_sighup(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(keys_yaml({"name": "alice"}, {"name": "bob"}))
    with edge_server(tmp_path, {"auth": {"keys_file": "keys.yaml"}}) as srv:
        kept = _connection(srv.http_port)
        body, _ = oip_body()
        assert _exchange(kept, "POST", f"/v2/models/{ECHO}/infer", body, bearer("alice")).status == 200
        kept_socket = kept.sock
        assert infer(srv, headers=bearer("carol")).status == 401
        assert infer(srv, headers=bearer("bob")).status == 200

        # carol in, bob out.
        temporary = keys.with_suffix(".new")
        temporary.write_text(keys_yaml({"name": "alice"}, {"name": "carol", "models": [ECHO]}))
        os.replace(temporary, keys)
        srv.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: infer(srv, headers=bearer("carol")).status == 200, 10), \
            f"carol's key refused 10 s after SIGHUP\n{srv.log()}"
        assert srv.process.poll() is None
        assert infer(srv, headers=bearer("bob")).status == 401, "bob's key still works after it was removed"
        assert infer(srv, OTHER, headers=bearer("carol")).status == 403
        body, _ = oip_body()
        assert _exchange(kept, "POST", f"/v2/models/{ECHO}/infer", body, bearer("alice")).status == 200
        assert kept.sock is kept_socket, "the keep-alive connection was closed by the reload"
        kept.close()
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            assert grpc_code(lambda: grpc_infer(client, headers={"x-api-key": KEY["carol"]})) == "OK"
        finally:
            client.close()

        # A keys file that does not parse: the keys in use stay, and the log says why.
        before = srv.log_size()
        keys.write_text("keys: [ {name: broken, sha256: \n")
        srv.process.send_signal(signal.SIGHUP)
        logged = wait_for(lambda: srv.log_since(before).strip(), 10)
        assert srv.process.poll() is None, f"a failed reload ended the server\n{srv.log()}"
        assert infer(srv, headers=bearer("carol")).status == 200
        assert infer(srv, headers=bearer("bob")).status == 401
        assert logged and "keys" in logged.lower(), f"no log line about the failed keys reload: {logged!r}"


# --------------------------------------------------------------------------------- rate limits

KEY_RATE, KEY_BURST = 20, 5
MODEL_RATE, MODEL_BURST = 30, 10
DRIVE_S = 5.0
OFFERED_PER_S = 200  # 7-10× the limits


@dataclass
class Sent:
    at: float
    status: int
    retry_after: str | None
    body: bytes


def drive(port: int, path: str, headers: dict | None, duration: float = DRIVE_S, rate: float = OFFERED_PER_S,
          threads: int = 4) -> list[Sent]:
    """Open-loop load at `rate` requests/s over `threads` keep-alive connections for `duration`."""
    sent: list[Sent] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.1
    stop = start + duration
    interval = threads / rate

    def worker(i: int) -> None:
        conn = _connection(port)
        due = start + i * interval / threads
        mine = []
        while due < stop:
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            at = time.monotonic()
            body, values = oip_body()
            try:
                reply = _exchange(conn, "POST", path, body, headers)
            except (OSError, http.client.HTTPException) as error:
                errors.append(f"{type(error).__name__}: {error}")
                conn.close()
                conn = _connection(port)
            else:
                if reply.status == 200 and reply.json()["outputs"][0]["data"] != values:
                    errors.append(f"wrong echo {reply.body[:200]!r} for {values}")
                mine.append(Sent(at, reply.status, reply.headers.get("retry-after"), reply.body))
            due = max(due + interval, time.monotonic() - interval)  # no catching up in a burst
        conn.close()
        with lock:
            sent.extend(mine)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, f"{len(errors)} requests failed: {errors[:5]}"
    return sorted(sent, key=lambda s: s.at)


def check_token_bucket(sent: list[Sent], rate: float, burst: int, what: str) -> int:
    """The 200s are what a bucket of `burst` refilled at `rate` lets through; returns the 429s."""
    by_status: dict[int, int] = {}
    for s in sent:
        by_status[s.status] = by_status.get(s.status, 0) + 1
    assert set(by_status) <= {200, 429}, f"{what}: statuses {by_status}, e.g. " + \
        repr(next(s.body[:300] for s in sent if s.status not in (200, 429)))
    span = sent[-1].at - sent[0].at
    offered = len(sent) / span
    assert offered > 4 * rate, f"{what}: the driver offered only {offered:.0f}/s"
    expected = rate * span + burst
    ok = by_status.get(200, 0)
    assert abs(ok - expected) <= 0.10 * expected + 2, \
        f"{what}: {ok} answered 200 in {span:.2f} s, expected {rate}×{span:.2f}+{burst} = {expected:.0f} ±10 %; {by_status}"
    # Spread out: each whole second after the first lets through about `rate`.
    per_second = [sum(1 for s in sent if s.status == 200 and int(s.at - sent[0].at) == second)
                  for second in range(int(span))]
    assert all(0.6 * rate <= n <= 1.4 * rate for n in per_second[1:]), f"{what}: 200s per second {per_second}"
    for s in sent:
        if s.status == 429:
            assert s.retry_after is not None and re.fullmatch(r"[1-9][0-9]*", s.retry_after), \
                f"{what}: 429 with Retry-After {s.retry_after!r}"
            assert isinstance(json.loads(s.body).get("error"), str), s.body[:300]
    return by_status.get(429, 0)


@pytest.fixture(scope="module")
def metered_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("edge-rate")
    (directory / "keys.yaml").write_text(keys_yaml({"name": "metered", "rate": KEY_RATE, "burst": KEY_BURST}, {"name": "dave"}))
    with edge_server(directory, {"auth": {"keys_file": "keys.yaml"}}) as srv:
        yield srv


def test_key_rate_limit(metered_server):
    srv = metered_server
    sent = drive(srv.http_port, f"/v2/models/{ECHO}/infer", bearer("metered"))
    refused = check_token_bucket(sent, KEY_RATE, KEY_BURST, "key metered")
    # Another key on the same model is not limited by metered's bucket.
    assert all(infer(srv, headers=bearer("dave")).status == 200 for _ in range(40))
    metrics = call(srv, "GET", "/metrics").body.decode()
    counted = metric(metrics, "sidecar_rate_limited_total", key="metered", model=ECHO)
    assert counted == refused, f"sidecar_rate_limited_total{{key=metered,model={ECHO}}} = {counted}, 429s seen {refused}\n" + \
        "\n".join(l for l in metrics.splitlines() if "rate_limited" in l)
    assert metric(metrics, "sidecar_rate_limited_total", key="dave") == 0
    for secret in KEY.values():
        assert secret not in metrics and sha256(secret) not in metrics, "a key (or its hash) appears in /metrics"
    # Retry-After is honest: after waiting that long the key is served again.
    time.sleep(int(sent[-1].retry_after or 1) if sent[-1].status == 429 else 1)
    assert infer(srv, headers=bearer("metered")).status == 200

    # gRPC: the same bucket, RESOURCE_EXHAUSTED past it.
    client = grpcclient.InferenceServerClient(srv.grpc_url)
    try:
        codes = [status_of(grpc_code(lambda: grpc_infer(client, headers={"x-api-key": KEY["metered"]}))) for _ in range(3 * KEY_BURST)]
    finally:
        client.close()
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
    metrics = call(srv, "GET", "/metrics").body.decode()
    assert metric(metrics, "sidecar_rate_limited_total", key="metered", model=ECHO) == refused + codes.count("RESOURCE_EXHAUSTED")


def test_model_rate_limit(tmp_path):
    config = {"rate_limits": {OTHER: {"rate": MODEL_RATE, "burst": MODEL_BURST}}}
    with edge_server(tmp_path, config) as srv:
        sent = drive(srv.http_port, f"/v2/models/{OTHER}/infer", None)
        refused = check_token_bucket(sent, MODEL_RATE, MODEL_BURST, f"model {OTHER}")
        # The other model has no limit.
        assert all(infer(srv, ECHO).status == 200 for _ in range(60))
        metrics = call(srv, "GET", "/metrics").body.decode()
        counted = metric(metrics, "sidecar_rate_limited_total", key="_model", model=OTHER)
        assert counted == refused, f"sidecar_rate_limited_total{{key=_model,model={OTHER}}} = {counted}, 429s seen {refused}\n" + \
            "\n".join(l for l in metrics.splitlines() if "rate_limited" in l)
        assert metric(metrics, "sidecar_rate_limited_total", model=ECHO) == 0
        time.sleep(1)
        client = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            codes = [status_of(grpc_code(lambda: grpc_infer(client, OTHER))) for _ in range(3 * MODEL_BURST)]
        finally:
            client.close()
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes


# ------------------------------------------------------------------------------- slow clients

MAX_CONNECTIONS = 2000
REQUEST_TIMEOUT_S = 2
IDLE_TIMEOUT_S = 3
SLACK_S = 1.5  # a loaded two-core host: timers fire late


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("edge-slow")
    config = {"limits": {"max_connections": MAX_CONNECTIONS, "request_timeout_s": REQUEST_TIMEOUT_S,
                         "idle_timeout_s": IDLE_TIMEOUT_S}}
    with edge_server(directory, config) as srv:
        yield srv


def _half_request(port: int, content_length: int = 1000, sent: int = 500) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST /v2/models/{ECHO}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {content_length}\r\n\r\n").encode() + b"x" * sent)
    return sock


def _read_until_closed(sock: socket.socket, started: float, limit: float) -> tuple[float | None, bytes, str]:
    """(seconds from `started` until the server closed, what it sent, how it ended)."""
    got = b""
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - started, got, "reset"
        if not chunk:
            return time.monotonic() - started, got, "eof"
        got += chunk
    return None, got, "open"


def _read_http_response(sock: socket.socket) -> bytes:
    """Reads one response (with Content-Length) from a raw socket; returns its head."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of an answer"
        rest += chunk
    return head


def _run_parallel(fns) -> list:
    results = [None] * len(fns)
    errors = []

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)
    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_half_sent_body_and_trickled_head_get_408_at_request_timeout(slow_server):
    port = slow_server.http_port

    def half():
        started = time.monotonic()
        sock = _half_request(port)
        try:
            return _read_until_closed(sock, started, REQUEST_TIMEOUT_S + 6)
        finally:
            sock.close()

    def trickle():
        """A head sent one byte every 100 ms: the 2 s count from its first byte, not its last."""
        head = (f"POST /v2/models/{ECHO}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {'a' * 200}\r\n"
                "Content-Length: 10\r\n\r\n0123456789").encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        started = time.monotonic()
        got = b""
        try:
            for i in range(len(head)):
                if time.monotonic() - started > REQUEST_TIMEOUT_S + 6:
                    return None, got, f"still open, {i} bytes sent"
                try:
                    sock.sendall(head[i:i + 1])
                except (BrokenPipeError, ConnectionResetError):
                    return time.monotonic() - started, got, "reset"
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    try:
                        chunk = sock.recv(65536)
                    except ConnectionResetError:
                        return time.monotonic() - started, got, "reset"
                    if not chunk:
                        return time.monotonic() - started, got, "eof"
                    got += chunk
            return None, got, "sent it all"
        finally:
            sock.close()

    results = _run_parallel([half] * 5 + [trickle] * 2)
    for kind, (closed_after, got, how) in zip(["half-body"] * 5 + ["trickled-head"] * 2, results):
        assert closed_after is not None, f"{kind}: still open {REQUEST_TIMEOUT_S + 6} s on ({how}); got {got[:200]!r}"
        assert REQUEST_TIMEOUT_S - 0.3 <= closed_after <= REQUEST_TIMEOUT_S + SLACK_S, \
            f"{kind}: closed after {closed_after:.2f} s ({how}), request_timeout_s {REQUEST_TIMEOUT_S}; got {got[:200]!r}"
        assert got.startswith(b"HTTP/1.1 408"), f"{kind}: closed after {closed_after:.2f} s ({how}) with {got[:200]!r}, expected a 408"
    assert infer(slow_server).status == 200


def test_clocks_hold_when_a_request_is_answered_before_its_body_arrives(slow_server):
    """A request answered at its head (404 for a model that does not exist) whose body goes on
    arriving: once it has, the connection is idle and closed at the idle timeout; if it never
    does, the request clock closes the connection without a second answer (no 408 after the 404)."""
    port = slow_server.http_port
    results = {}
    for case in ("finished", "abandoned"):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b"x" * 500)
            head = _read_http_response(sock)
            assert head.startswith(b"HTTP/1.1 404"), head
            started = time.monotonic()
            if case == "finished":
                sock.sendall(b"x" * 500)
            closed, got, how = _read_until_closed(sock, started, max(REQUEST_TIMEOUT_S, IDLE_TIMEOUT_S) + 5)
            results[case] = (closed, got, how)
        finally:
            sock.close()
    closed, got, how = results["finished"]
    assert closed is not None, "a connection whose early-answered request then finished was never closed (idle clock lost)"
    assert IDLE_TIMEOUT_S - 0.3 <= closed <= IDLE_TIMEOUT_S + SLACK_S, f"closed {closed:.2f} s after its body ended ({how})"
    closed, got, how = results["abandoned"]
    assert closed is not None, "a connection holding half of an early-answered request was never closed"
    assert closed <= REQUEST_TIMEOUT_S + SLACK_S, f"closed after {closed:.2f} s"
    assert b"408" not in got, f"a second answer after the 404: {got[:200]!r}"


def test_pipelined_requests_keep_their_answers_in_order(slow_server):
    """Two requests sent at once on one connection: both answered, in order, with nothing else."""
    port = slow_server.http_port
    body = b'{"instances": [7]}'
    one = (f"POST /v1/models/{ECHO}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(one + one)
        first, second = _read_http_response(sock), _read_http_response(sock)
    finally:
        sock.close()
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200"), (first, second)


def test_idle_connections_closed_at_idle_timeout(slow_server):
    port = slow_server.http_port
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    read_response = _read_http_response

    def after_one_request():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock.sendall(ready)
            head = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
            return _read_until_closed(sock, time.monotonic(), IDLE_TIMEOUT_S + 6)
        finally:
            sock.close()

    def silent():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            return _read_until_closed(sock, time.monotonic(), IDLE_TIMEOUT_S + 6)
        finally:
            sock.close()

    def busy():
        """A request every second for 5 s (longer than idle_timeout in all): never closed."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            for _ in range(6):
                sock.sendall(ready)
                head = read_response(sock)
                assert head.startswith(b"HTTP/1.1 200"), head
                time.sleep(1.0)
            return "served"
        finally:
            sock.close()

    kept, quiet, active = _run_parallel([after_one_request, silent, busy])
    for what, (closed_after, got, how) in (("keep-alive after one request", kept), ("a connection that sends nothing", quiet)):
        assert closed_after is not None, f"{what}: still open after {IDLE_TIMEOUT_S + 6} s"
        assert IDLE_TIMEOUT_S - 0.3 <= closed_after <= IDLE_TIMEOUT_S + SLACK_S, \
            f"{what}: closed after {closed_after:.2f} s ({how}, sent {got[:100]!r}); idle_timeout_s {IDLE_TIMEOUT_S}"
    assert active == "served"


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def test_grpc_idle_connection_gets_goaway(slow_server):
    """A raw HTTP/2 connection: preface, SETTINGS, then nothing. The server must send GOAWAY and close
    at idle_timeout; pings and SETTINGS are answered as a client would."""
    sock = socket.create_connection(("127.0.0.1", slow_server.grpc_port), timeout=10)
    started = time.monotonic()
    sock.sendall(H2_PREFACE + _h2_frame(4, 0, 0))
    buffer = b""
    goaway_at = closed_at = None
    kinds = []
    sock.settimeout(0.2)
    try:
        while time.monotonic() - started < IDLE_TIMEOUT_S + 6:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                closed_at = time.monotonic() - started
                break
            if not chunk:
                closed_at = time.monotonic() - started
                break
            buffer += chunk
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags = buffer[3], buffer[4]
                payload = buffer[9:9 + length]
                buffer = buffer[9 + length:]
                kinds.append(kind)
                if kind == 4 and not flags & 1:
                    sock.sendall(_h2_frame(4, 1, 0))
                elif kind == 6 and not flags & 1:
                    sock.sendall(_h2_frame(6, 1, 0, payload))
                elif kind == 7 and goaway_at is None:
                    goaway_at = time.monotonic() - started
    finally:
        sock.close()
    assert goaway_at is not None, f"no GOAWAY within {IDLE_TIMEOUT_S + 6} s (frames {kinds}, closed at {closed_at})"
    assert IDLE_TIMEOUT_S - 0.3 <= goaway_at <= IDLE_TIMEOUT_S + SLACK_S, f"GOAWAY after {goaway_at:.2f} s (frames {kinds})"
    assert closed_at is not None and closed_at - goaway_at <= 2.0, f"GOAWAY at {goaway_at:.2f} s, closed at {closed_at}"


def _hpack_literal(headers: list[tuple[str, str]]) -> bytes:
    """Headers as HPACK literals without indexing (no Huffman): what any HTTP/2 peer must accept."""
    out = b""
    for name, value in headers:
        assert len(name) < 127 and len(value) < 127
        out += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return out


def _grpc_headers(port: int, method: str) -> bytes:
    return _hpack_literal([(":method", "POST"), (":scheme", "http"), (":path", f"/inference.GRPCInferenceService/{method}"),
                           (":authority", f"127.0.0.1:{port}"), ("content-type", "application/grpc"), ("te", "trailers")])


def _watch_stream(sock: socket.socket, started: float, limit: float) -> tuple[float | None, list[int]]:
    """Reads frames for up to `limit` s, answering SETTINGS and PING; returns when stream 1 was reset
    (RST_STREAM) or ended (HEADERS with END_STREAM: trailers), and the frame types seen."""
    buffer, kinds = b"", []
    sock.settimeout(0.1)
    while time.monotonic() - started < limit:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return None, kinds
        buffer += chunk
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags, stream = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload = buffer[9:9 + length]
            buffer = buffer[9 + length:]
            kinds.append(kind)
            if kind == 4 and not flags & 1:
                sock.sendall(_h2_frame(4, 1, 0))
            elif kind == 6 and not flags & 1:
                sock.sendall(_h2_frame(6, 1, 0, payload))
            elif stream == 1 and (kind == 3 or (kind == 1 and flags & 1)):
                return time.monotonic() - started, kinds
    return None, kinds


def test_grpc_half_sent_message_is_reset_at_request_timeout(slow_server):
    """A ModelInfer call whose message never finishes (5-byte prefix for 100 bytes, 10 sent) holds
    its stream only until the request timeout: then the stream is reset (or ended with a status)."""
    port = slow_server.grpc_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        started = time.monotonic()
        sock.sendall(H2_PREFACE + _h2_frame(4, 0, 0) + _h2_frame(1, 4, 1, _grpc_headers(port, "ModelInfer"))
                     + _h2_frame(0, 0, 1, b"\x00" + struct.pack(">I", 100) + b"x" * 10))
        ended, kinds = _watch_stream(sock, started, REQUEST_TIMEOUT_S + 4)
    finally:
        sock.close()
    assert ended is not None, f"the half-sent call was not reset within {REQUEST_TIMEOUT_S + 4} s (frames {kinds})"
    assert REQUEST_TIMEOUT_S - 0.3 <= ended <= REQUEST_TIMEOUT_S + SLACK_S, f"reset after {ended:.2f} s (frames {kinds})"


def test_grpc_stream_call_may_wait_between_messages_but_not_inside_one(slow_server):
    """ModelStreamInfer: a stream quiet between messages for longer than the request timeout is
    kept; a message left half sent is reset at the request timeout."""
    port = slow_server.grpc_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        started = time.monotonic()
        sock.sendall(H2_PREFACE + _h2_frame(4, 0, 0) + _h2_frame(1, 4, 1, _grpc_headers(port, "ModelStreamInfer")))
        ended, kinds = _watch_stream(sock, started, REQUEST_TIMEOUT_S + 1)
        assert ended is None, f"a stream waiting between messages was ended after {ended:.2f} s (frames {kinds})"
        half_at = time.monotonic()
        sock.sendall(_h2_frame(0, 0, 1, b"\x00" + struct.pack(">I", 50) + b"y" * 5))
        ended, kinds = _watch_stream(sock, half_at, REQUEST_TIMEOUT_S + 4)
    finally:
        sock.close()
    assert ended is not None, f"the half-sent message was not reset within {REQUEST_TIMEOUT_S + 4} s (frames {kinds})"
    assert REQUEST_TIMEOUT_S - 0.3 <= ended <= REQUEST_TIMEOUT_S + SLACK_S, f"reset {ended:.2f} s after the half message (frames {kinds})"


def test_grpcio_channel_idle_then_reconnects_and_open_stream_survives(slow_server):
    channel = grpc.insecure_channel(slow_server.grpc_url)
    changes: list[tuple[float, grpc.ChannelConnectivity]] = []
    channel.subscribe(lambda state: changes.append((time.monotonic(), state)), try_to_connect=False)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live
        last_call = time.monotonic()
        time.sleep(IDLE_TIMEOUT_S + SLACK_S + 0.5)
        after = [(round(t - last_call, 2), s.name) for t, s in changes if t > last_call]
        assert any(s != "READY" for _, s in after), \
            f"the grpcio channel stayed READY {IDLE_TIMEOUT_S + SLACK_S + 0.5:.1f} s after its last call (changes {after})"
        first_drop = next(t for t, s in after if s != "READY")
        assert IDLE_TIMEOUT_S - 0.3 <= first_drop <= IDLE_TIMEOUT_S + SLACK_S, f"channel left READY after {first_drop} s: {after}"
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live  # reconnects
    finally:
        channel.close()

    # A connection with an open stream is not idle: ModelStreamInfer open, nothing sent for 5 s.
    answers = stream_infer(slow_server.grpc_url, messages=2, pause_s=IDLE_TIMEOUT_S + 2)
    assert [e for _, e, _ in answers] == [None, None], [str(e) for _, e, _ in answers]
    np.testing.assert_array_equal(answers[1][0].as_numpy("x"), answers[1][2])


def _socket_count(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


ATTACK_OPEN_RATE = 200  # per attacker process: 3 × 1000 connections in 5 s, ~1200 held at once (each for request_timeout)


def test_slowloris_attack_leaves_good_clients_served(slow_server):
    """3 processes × 1000 connections, each holding half a POST body. While they hold, a client
    opening a fresh connection per request and a keep-alive client are served; each held connection
    is closed by the server (408) about request_timeout after its first byte; the server's sockets
    stay within max_connections and go back to what they were.

    The connections open at 3 × 200/s, which a debug build on two cores accepts as they come: much
    faster (≥ 1000/s) and the listen backlog overflows, so that every client, good or not, waits
    1-3 s for its TCP handshake (SYN retransmits) before the server ever sees it: a connection
    flood, bounded by the listen backlog and the accept rate rather than by the slow-client limits."""
    srv = slow_server
    baseline = _socket_count(srv.process.pid)
    attackers = [subprocess.Popen(
        [sys.executable, str(ATTACKER), json.dumps({
            "port": srv.http_port, "connections": 1000, "duration_s": 15, "open_rate": ATTACK_OPEN_RATE,
            "path": f"/v2/models/{ECHO}/infer", "content_length": 1000, "sent_body": 500})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    started = time.monotonic()
    ramp_s = 1000 / ATTACK_OPEN_RATE
    good_until = ramp_s + REQUEST_TIMEOUT_S  # the last held connection opened, and its timeout
    sockets_seen: list[tuple[float, int]] = []
    stop_sampling = threading.Event()

    def sample():
        while not stop_sampling.wait(0.25):
            sockets_seen.append((round(time.monotonic() - started, 2), _socket_count(srv.process.pid)))
    sampler = threading.Thread(target=sample)
    sampler.start()
    # (seconds into the attack, latency, status or error)
    fresh: list[tuple[float, float, int | str]] = []
    kept: list[tuple[float, float, int | str]] = []
    fresh_connect: list[float | None] = []  # of which the TCP connect (seconds)
    try:
        time.sleep(0.5)

        def fresh_client():
            while time.monotonic() - started < good_until:
                t = time.monotonic()
                conn = _connection(srv.http_port)
                try:
                    conn.connect()
                    connected = time.monotonic() - t
                    body, values = oip_body()
                    reply = _exchange(conn, "POST", f"/v2/models/{ECHO}/infer", body)
                    status = reply.status if reply.status != 200 or reply.json()["outputs"][0]["data"] == values else "wrong echo"
                except (OSError, http.client.HTTPException) as error:
                    connected = None
                    status = f"{type(error).__name__}: {error}"
                finally:
                    conn.close()
                fresh.append((round(t - started, 2), time.monotonic() - t, status))
                fresh_connect.append(connected)
                time.sleep(0.05)

        def keepalive_client():
            conn = _connection(srv.http_port)
            first_socket = None
            try:
                while time.monotonic() - started < good_until:
                    t = time.monotonic()
                    body, values = oip_body()
                    try:
                        reply = _exchange(conn, "POST", f"/v2/models/{ECHO}/infer", body)
                        first_socket = first_socket or conn.sock
                        status = reply.status if conn.sock is first_socket else "on a new connection"
                    except (OSError, http.client.HTTPException) as error:
                        status = f"{type(error).__name__}: {error}"
                        conn.close()
                    kept.append((round(t - started, 2), time.monotonic() - t, status))
                    time.sleep(0.1)
            finally:
                conn.close()
        _run_parallel([fresh_client, keepalive_client])
    finally:
        summaries = []
        for attacker in attackers:
            try:
                out, err = attacker.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                attacker.kill()
                out, err = attacker.communicate()
            summaries.append(json.loads(out.strip().splitlines()[-1]) if attacker.returncode == 0 else {"failed": err[-2000:]})
        stop_sampling.set()
        sampler.join()
    report = json.dumps(summaries, indent=1)
    assert all("failed" not in s for s in summaries), report
    metrics = call(srv, "GET", "/metrics").body.decode()
    closed = "\n".join(l for l in metrics.splitlines() if l.startswith("sidecar_connections"))
    report += f"\nserver sockets (s, n): {sockets_seen}\n{closed}"
    report += f"\nfresh connections' TCP connect times (s): {[None if c is None else round(c, 3) for c in fresh_connect]}"

    # The attack was real: 3000 connections, each held until the server closed it, so that about
    # opening rate × request_timeout were open at once.
    opened = sum(s["opened"] for s in summaries)
    assert opened == 3000, f"only {opened} attack connections opened\n{report}"
    assert sum(s["peak_open"] for s in summaries) >= 0.8 * 3 * ATTACK_OPEN_RATE * REQUEST_TIMEOUT_S, report

    # Good clients were served throughout, with modest latency.
    def summary(samples):
        latencies = sorted(t for _, t, _ in samples)
        slow = [(at, round(t, 2), st) for at, t, st in samples if t > 0.5 or st != 200]
        return (f"{len(samples)} requests, p50 {1000 * statistics.median(latencies):.0f} ms, "
                f"max {1000 * latencies[-1]:.0f} ms; slow or failed (at s, took s, status): {slow[:12]}")
    problems = []
    for what, samples in (("fresh connection per request", fresh), ("keep-alive connection", kept)):
        if len(samples) < 10:
            problems.append(f"{what}: only {summary(samples) if samples else '0 requests'}")
            continue
        latencies = sorted(t for _, t, _ in samples)
        if not all(st == 200 for _, _, st in samples) or statistics.median(latencies) > 0.5 or latencies[-1] > 3.0:
            problems.append(f"{what}: {summary(samples)}")
    assert not problems, "\n".join(problems) + f"\n{report}"

    # The server held no more than max_connections on its HTTP listener (plus its other sockets).
    assert max(n for _, n in sockets_seen) <= MAX_CONNECTIONS + baseline + 10, \
        f"the server held more sockets than max_connections {MAX_CONNECTIONS} (+{baseline} before)\n{report}"

    # Every half request was closed by the server, with a 408, about request_timeout after its first
    # byte (or earlier, if it was evicted to make room).
    outcomes: dict[str, int] = {}
    for s in summaries:
        for k, n in s["outcomes"].items():
            outcomes[k] = outcomes.get(k, 0) + n
    assert set(outcomes) <= {"408", "eof", "reset"} and sum(s["held_at_end"] for s in summaries) == 0, \
        f"attack connections ended otherwise: {outcomes}\n{report}"
    assert outcomes.get("408", 0) >= 1000, f"outcomes {outcomes}\n{report}"
    longest = max(max((h["max"] for h in s["hold_s"].values()), default=0) for s in summaries)
    assert longest <= REQUEST_TIMEOUT_S + 2 * SLACK_S, \
        f"an attack connection was held {longest:.2f} s (request_timeout_s {REQUEST_TIMEOUT_S})\n{report}"

    # Afterwards the sockets are given back and the server answers as before.
    assert wait_for(lambda: _socket_count(srv.process.pid) <= baseline + 10, 10), \
        f"{_socket_count(srv.process.pid)} sockets 10 s after the attack ({baseline} before)"
    assert infer(srv).status == 200


def test_max_connections_closes_the_longest_idle_else_refuses(tmp_path):
    """A small cap (8), long timeouts: a new connection at the cap closes the keep-alive connection
    idle the longest; with every connection in the middle of a request (and none quiet), the new
    connection is refused."""
    cap = 8
    config = {"limits": {"max_connections": cap, "request_timeout_s": 30, "idle_timeout_s": 60}}
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with edge_server(tmp_path, config) as srv:
        time.sleep(0.5)  # the readiness probes' connections are gone

        def keepalive() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", srv.http_port), timeout=5)
            sock.sendall(ready)
            assert _read_http_response(sock).startswith(b"HTTP/1.1 200"), "no answer"
            return sock

        def closed(sock: socket.socket, wait: float = 2.0) -> bool:
            sock.settimeout(wait)
            try:
                return sock.recv(1) == b""
            except socket.timeout:
                return False
            except ConnectionResetError:
                return True

        idle = []
        for _ in range(cap):
            idle.append(keepalive())
            time.sleep(0.05)
        # One over the cap: the first (idle the longest) goes, the newcomer is served.
        newcomer = keepalive()
        assert closed(idle[0]), "the longest-idle keep-alive connection was not closed at the cap"
        assert not any(closed(sock, 0.2) for sock in idle[1:]), "another connection than the longest-idle was closed"
        newcomer.sendall(ready)
        assert _read_http_response(newcomer).startswith(b"HTTP/1.1 200")
        for sock in idle + [newcomer]:
            sock.close()
        time.sleep(0.5)

        # Every slot busy: connections trickling a request head, a byte every 0.2 s.
        stop = threading.Event()
        busy = [socket.create_connection(("127.0.0.1", srv.http_port), timeout=5) for _ in range(cap)]

        def trickle():
            head = b"POST /v2/models/edge_echo/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 1000
            for i in range(len(head)):
                if stop.wait(0.2):
                    return
                for sock in busy:
                    try:
                        sock.sendall(head[i:i + 1])
                    except OSError:
                        pass
        trickler = threading.Thread(target=trickle)
        trickler.start()
        try:
            time.sleep(1.5)
            refused = socket.create_connection(("127.0.0.1", srv.http_port), timeout=5)
            try:
                refused.sendall(ready)
                got = _read_until_closed(refused, time.monotonic(), 5)
            except (BrokenPipeError, ConnectionResetError):
                got = (0.0, b"", "reset")
            finally:
                refused.close()
            assert got[0] is not None and not got[1].startswith(b"HTTP/1.1 200"), \
                f"every connection busy, yet the new one was {'answered' if got[1] else 'kept open'}: {got}"
            survivors = sum(not closed(sock, 0.1) for sock in busy)
            assert survivors == cap, f"only {survivors} of the {cap} busy connections are still open"
        finally:
            stop.set()
            trickler.join()
            for sock in busy:
                sock.close()

        # The slots come back as the server sees the busy connections close.
        def served() -> bool:
            try:
                return infer(srv).status == 200
            except (OSError, http.client.HTTPException):
                return False
        assert wait_for(served, 5), "no connection admitted 5 s after the busy ones closed"


# -------------------------------------------------------------------------- bad configuration


def _serve_config(tmp_path: Path, config: dict, timeout: float = 60) -> tuple[int | None, str]:
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [SIDECAR_BIN, "serve", str(MODELS / ECHO), "--config", str(path), "--http-port", str(_free_port()),
               "--grpc-port", str(_free_port()), "--no-admin", "--cache-dir", CACHE_DIR]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO))
    try:
        out, _ = process.communicate(timeout=timeout)
        return process.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        return None, out.decode(errors="replace")


@pytest.mark.parametrize("case", ["keys_file-missing", "keys_file-directory", "cert_file-missing", "cert_file-garbage",
                                  "key_file-missing", "client_ca_file-missing"])
def test_bad_configuration_refused_naming_the_key(case, pki, tmp_path):
    install_cert(tmp_path, pki["server"])
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "garbage.crt").write_text("this is not a certificate\n")
    tls = {"cert_file": "server.crt", "key_file": "server.key"}
    config, key = {
        "keys_file-missing": ({"auth": {"keys_file": "no-such-keys.yaml"}}, "auth.keys_file"),
        "keys_file-directory": ({"auth": {"keys_file": "a-directory"}}, "auth.keys_file"),
        "cert_file-missing": ({"tls": dict(tls, cert_file="no-such.crt")}, "tls.cert_file"),
        "cert_file-garbage": ({"tls": dict(tls, cert_file="garbage.crt")}, "tls.cert_file"),
        "key_file-missing": ({"tls": dict(tls, key_file="no-such.key")}, "tls.key_file"),
        "client_ca_file-missing": ({"tls": dict(tls, client_ca_file="no-such-ca.crt")}, "tls.client_ca_file"),
    }[case]
    code, output = _serve_config(tmp_path, config)
    assert code is not None, f"sidecar serve kept running with {config}\n{output[-3000:]}"
    assert code != 0, f"sidecar serve exited 0 with {config}\n{output[-3000:]}"
    assert key in output, f"exit {code}, but the message does not name {key}:\n{output[-3000:]}"
