"""TLS keys in the configuration (DESIGN §9): ``tls`` and ``tls-ca`` in the
resource (and group) table, ``tls-cert`` and ``tls-key`` in each node's
table; every mistake is a ConfigError naming the key: at load for the
table's shape, when used (``tls_context``, at start and at every
connection) for the files, which a node has only its own of."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fixtures.tls_certs import make_ca, make_cert
from replicator.config import ConfigError, parse_config
from fixtures.configs import two_node_config

P = "/etc/duplex/duplex.toml"
REPO = Path(__file__).resolve().parents[2]
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="the openssl command makes the test certificates")


_config = two_node_config


ON = 'tls = true\ntls-ca = "/etc/duplex/ca.pem"'
A = 'tls-cert = "/etc/duplex/alpha.pem"\ntls-key = "/etc/duplex/alpha.key"'
B = 'tls-cert = "/etc/duplex/beta.pem"\ntls-key = "/etc/duplex/beta.key"'


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, P)
    return str(e.value)


def test_tls_is_off_by_default_and_read_when_on():
    r = parse_config(_config(), P).resource("r0")
    assert r.tls is False and r.tls_context("alpha", server=False) is None
    r = parse_config(_config(ON, A, B), P).resource("r0")
    assert r.tls and r.tls_ca == "/etc/duplex/ca.pem"
    assert r.node("beta").tls_cert == "/etc/duplex/beta.pem"
    assert r.node("alpha").tls_key == "/etc/duplex/alpha.key"


@pytest.mark.parametrize("res, alpha, beta, key, words", [
    ("tls = true", A, B, "resource.r0.tls-ca", "required when tls = true"),
    (ON, 'tls-key = "/etc/duplex/alpha.key"', B, "resource.r0.on.alpha.tls-cert",
     "required when tls = true"),
    (ON, A, 'tls-cert = "/etc/duplex/beta.pem"', "resource.r0.on.beta.tls-key",
     "required when tls = true"),
    ('tls = "yes"\ntls-ca = "/ca.pem"', A, B, "resource.r0.tls", "must be true or false"),
    ('tls-ca = "/etc/duplex/ca.pem"', "", "", "resource.r0.tls-ca",
     "is set but tls is not true"),
    ("", A, "", "resource.r0.on.alpha.tls-cert", "is set but tls is not true"),
    (ON, 'tls-cert = "alpha.pem"\ntls-key = "/k"', B, "resource.r0.on.alpha.tls-cert",
     "is not an absolute path"),
    ('tls = true\ntls-ca = "ca.pem"', A, B, "resource.r0.tls-ca", "is not an absolute path"),
    (ON, A + '\ntls-certs = "/x"', B, "resource.r0.on.alpha.tls-certs", "did you mean"),
])
def test_table_mistakes_name_the_key(res, alpha, beta, key, words):
    msg = _error(_config(res, alpha, beta))
    assert msg.startswith(f"{P}: {key}: "), msg
    assert words in msg


def _group(tls: str, m0: str = "", m1: str = "") -> str:
    text = _config(ON, A, B) + textwrap.dedent("""\
        [resource.r1]
        secret-file = "/etc/duplex/r1.secret"
        [resource.r1.on.gamma]
        address = "10.0.0.3:7790"
        device = "/dev/sdb"
        meta-dir = "/var/lib/duplex/r1"
        [resource.r1.on.delta]
        address = "10.0.0.4:7790"
        device = "/dev/sdb"
        meta-dir = "/var/lib/duplex/r1"
        [group.g0]
        resources = ["r0", "r1"]
        secret-file = "/etc/duplex/g0.secret"
        """) + tls + "\n"
    for i, n in enumerate(("alpha", "beta", "gamma", "delta")):
        files = m0 if i == 0 else m1 if i == 1 else \
            f'tls-cert = "/etc/duplex/{n}.pem"\ntls-key = "/etc/duplex/{n}.key"'
        text += f'[group.g0.on.{n}]\naddress = "10.0.1.{i + 1}:7799"\n{files}\n'
    return text


def test_group_tls_is_read():
    g = parse_config(_group(ON, A, B), P).group("g0")
    assert g.tls and g.tls_ca == "/etc/duplex/ca.pem"
    assert g.tls_files["gamma"] == ("/etc/duplex/gamma.pem", "/etc/duplex/gamma.key")


@pytest.mark.parametrize("tls, m0, key, words", [
    ("tls = true", A, "group.g0.tls-ca", "required when tls = true"),
    (ON, 'tls-cert = "/a.pem"', "group.g0.on.alpha.tls-key", "required when tls = true"),
    ("tls = 1", A, "group.g0.tls", "must be true or false"),
])
def test_group_table_mistakes_name_the_key(tls, m0, key, words):
    msg = _error(_group(tls, m0, B))
    assert msg.startswith(f"{P}: {key}: "), msg
    assert words in msg


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificates")
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    make_cert(d, ca, "alpha")
    make_cert(d, ca, "beta")
    return d


def _resource(pki: Path, **files: str):
    f = {"ca": f"{pki}/ca.pem", "cert": f"{pki}/alpha.pem", "key": f"{pki}/alpha.key", **files}
    text = _config(f'tls = true\ntls-ca = "{f["ca"]}"',
                   f'tls-cert = "{f["cert"]}"\ntls-key = "{f["key"]}"',
                   f'tls-cert = "{pki}/beta.pem"\ntls-key = "{pki}/beta.key"')
    return parse_config(text, P).resource("r0")


def _file_error(pki: Path, **files: str) -> str:
    with pytest.raises(ConfigError) as e:
        _resource(pki, **files).tls_context("alpha", server=False)
    return str(e.value)


@needs_openssl
def test_good_files_make_a_context_for_either_side(pki):
    r = _resource(pki)
    assert r.tls_context("alpha", server=False) is not None
    assert r.tls_context("beta", server=True) is not None


@needs_openssl
def test_file_mistakes_name_the_key_and_the_file(pki, tmp_path):
    key_alpha = f"{P}: resource.r0.on.alpha"
    msg = _file_error(pki, cert=f"{tmp_path}/missing.pem")
    assert msg == f"{key_alpha}.tls-cert: {tmp_path}/missing.pem does not exist"
    msg = _file_error(pki, ca=f"{tmp_path}/nope.pem")
    assert msg == f"{P}: resource.r0.tls-ca: {tmp_path}/nope.pem does not exist"
    msg = _file_error(pki, key=str(tmp_path))
    assert msg == f"{key_alpha}.tls-key: {tmp_path} is not a regular file"
    open_key = tmp_path / "open.key"
    open_key.write_bytes((pki / "alpha.key").read_bytes())
    open_key.chmod(0o644)
    msg = _file_error(pki, key=str(open_key))
    assert msg.startswith(f"{key_alpha}.tls-key: {open_key} is readable by every user")
    assert "chmod 600" in msg
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    junk.chmod(0o600)
    assert _file_error(pki, cert=str(junk)) == \
        f"{key_alpha}.tls-cert: {junk} holds no PEM certificate"
    assert _file_error(pki, ca=str(junk)) == f"{P}: resource.r0.tls-ca: {junk} holds no PEM certificate"
    assert _file_error(pki, key=str(junk)) == f"{key_alpha}.tls-key: {junk} holds no PEM private key"
    # beta's key with alpha's certificate
    msg = _file_error(pki, key=f"{pki}/beta.key")
    assert msg == (f"{key_alpha}.tls-key: {pki}/beta.key is not the key of "
                   f"{key_alpha}.tls-cert {pki}/alpha.pem")


@needs_openssl
def test_up_with_a_missing_certificate_is_one_line_naming_the_key(pki, tmp_path):
    # The secondary checks its TLS files before it listens: no traceback.
    cfg = tmp_path / "duplex.toml"
    secret = tmp_path / "r0.secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    text = _config(f'tls = true\ntls-ca = "{pki}/ca.pem"',
                   f'tls-cert = "{pki}/alpha.pem"\ntls-key = "{pki}/alpha.key"',
                   f'tls-cert = "{tmp_path}/beta-missing.pem"\ntls-key = "{pki}/beta.key"')
    text = text.replace("/etc/duplex/r0.secret", str(secret))
    text = text.replace("/var/lib/duplex/r0", str(tmp_path / "meta"))
    img = tmp_path / "beta.img"
    img.write_bytes(b"\0" * (4 << 20))
    text = text.replace('device = "/dev/sdb"', f'device = "{img}"')
    # An address of this host (checked first); the TLS files fail before it is bound.
    text = text.replace("10.0.0.2:7789", f"127.0.0.1:{40000 + os.getpid() % 20000}")
    cfg.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "replicator.cli", "--config", str(cfg), "--node", "beta"]
    r = subprocess.run([*cmd, "create-md", "r0"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cmd, "up", "r0", "--role", "secondary"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert f"resource.r0.on.beta.tls-cert: {tmp_path}/beta-missing.pem does not exist" \
        in r.stderr, r.stderr
