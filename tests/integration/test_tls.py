"""TLS and mutual TLS on a real coordinator, with certificates this test makes itself (`cryptography`):
a CA, a server certificate for 127.0.0.1/localhost (IP and DNS SANs), a client certificate, and a
second, unrelated CA. TLS works; a plain-text client, a client trusting the wrong CA, and (with mTLS)
a client without a certificate are refused; with its certificate it gets in."""
from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clients.python.client import Client
from shared.server import ClientTls, ServerTls


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key, issuer_cert=None, issuer_key=None, *, ca=False, sans=(), usage=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki():
    """PEM bytes: ca, server_cert, server_key, client_cert, client_key, other_ca."""
    ca_key, other_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = _certificate("edgeforge test CA", ca_key, ca=True)
    other_ca = _certificate("some other CA", other_key, ca=True)
    server = _certificate("edgeforge coordinator", server_key, ca, ca_key,
                          sans=(x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")),
                          usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _certificate("edgeforge client", client_key, ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = lambda cert: cert.public_bytes(serialization.Encoding.PEM)
    return {"ca": pem(ca), "server_cert": pem(server), "server_key": _pem(server_key), "client_cert": pem(client),
            "client_key": _pem(client_key), "other_ca": pem(other_ca)}


def _serve(tmp_path, tls: ServerTls):
    from services.coordinator.server import create_server
    server, port, ctx = create_server("127.0.0.1:0", tmp_path / "data", tls=tls)
    return server, f"127.0.0.1:{port}", ctx


def _refused(address: str, token: str, tls: ClientTls | None) -> None:
    client = Client(address, token=token, tls=tls)
    try:
        with pytest.raises(grpc.RpcError) as error:
            client.list_builds()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
    finally:
        client.close()


def test_tls_serves_and_refuses_plain_text_and_the_wrong_ca(tmp_path, pki):
    server, address, ctx = _serve(tmp_path, ServerTls(pki["server_cert"], pki["server_key"]))
    try:
        client = Client(address, token=ctx.admin_token, tls=ClientTls(pki["ca"]))
        assert client.list_builds() == [] and client.whoami().display_name == "coordinator (internal)"
        client.close()
        _refused(address, ctx.admin_token, None)                              # plain text
        _refused(address, ctx.admin_token, ClientTls(pki["other_ca"]))          # the server's cert is not trusted
    finally:
        server.stop(0).wait()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(tmp_path, pki):
    tls = ServerTls(pki["server_cert"], pki["server_key"], client_ca_pem=pki["ca"])
    server, address, ctx = _serve(tmp_path, tls)
    try:
        _refused(address, ctx.admin_token, ClientTls(pki["ca"]))                # no client certificate
        _refused(address, ctx.admin_token, None)
        client = Client(address, token=ctx.admin_token,
                        tls=ClientTls(pki["ca"], pki["client_cert"], pki["client_key"]))
        assert client.list_builds() == []
        assert client.create_token("builder", "over mTLS")[1].startswith("ef_")
        client.close()
        no_token = Client(address, token=None, tls=ClientTls(pki["ca"], pki["client_cert"], pki["client_key"]))
        with pytest.raises(grpc.RpcError) as error:                           # TLS is no substitute for a token
            no_token.list_builds()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        no_token.close()
        _agent_registers_over_mtls(tmp_path, address, ctx, pki)
    finally:
        server.stop(0).wait()


def _agent_registers_over_mtls(tmp_path, address: str, ctx, pki) -> None:
    """The device agent's own TLS flags (it ships without shared/): it registers over mTLS."""
    import argparse

    from clients.agent.config import config_from, parser
    from clients.agent.main import Agent
    files = {}
    for name in ("ca", "client_cert", "client_key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_bytes(pki[name])
    token = ctx.tokens.create("agent", "agent over mTLS")[1]
    args = parser("edgeforge-agent\n\nusage\n\nepilog").parse_args(["--coordinator", address, "--token", token, "--tls-ca", str(files["ca"]),
                                "--tls-cert", str(files["client_cert"]), "--tls-key", str(files["client_key"]),
                                "--cache-dir", str(tmp_path / "agent")])
    agent = Agent(config_from(args))
    worker = agent.local_worker()
    worker.register()
    assert ctx.state.devices() and worker.name in [device.name for device, _ in ctx.state.devices()]
    agent._channel.close()
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        config_from(argparse.Namespace(**{**vars(args), "tls_key": None}))
