"""The group control channel over TLS (group/channel.py, DESIGN §9): a real
master and member on loopback sockets, a relay between them that records
every byte, certificates made with openssl. A message crosses in TLS and
not in clear; a plaintext member, a certificate of another CA, a
certificate naming a node outside the group, and a HELLO claiming another
node than the certificate are refused with the reason on the member's side
and in the master's log."""
from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from fixtures.tls_certs import Cert, make_ca, make_cert
from replicator.group.channel import GroupClient, GroupLink, GroupServer
from replicator.protocol.group import GroupConnection
from replicator.supervise import Supervisor
from replicator.tls import TlsFiles, make_context

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command makes the test certificates")

SECRET = b"group-secret"
PROBE = "GroupTlsProbeText-7f3c"
NODES = {"m1", "b1", "b2"}


class Relay:
    """A TCP relay on loopback that keeps every byte it forwards."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.data = bytearray()
        self._lock = threading.Lock()
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.address = self.ls.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.ls.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:
                    self.data += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.ls.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    out = {"ca": ca, **{n: make_cert(d, ca, n) for n in sorted(NODES)}}
    out["outsider"] = make_cert(d, ca, "x9")
    other = make_ca(d / "other", name="rogue")
    out["rogue-ca"] = other
    out["b1-rogue"] = make_cert(d / "other", other, "b1")
    return out


def _ctx(pki, node_cert: Cert, server: bool, ca: Cert | None = None):
    ca = ca or pki["ca"]
    return make_context(TlsFiles(str(ca.cert), str(node_cert.cert), str(node_cert.key)), server)


class Channel:
    """A master on loopback (behind a Relay) and one member dialling it."""

    def __init__(self, server_tls, client_tls, member_node: str = "b1") -> None:
        self.sup = Supervisor("test group channel")
        self.received: list = []
        self.links: list[GroupLink] = []
        self.closed: list[str] = []
        self.member_up = threading.Event()
        self.got = threading.Event()

        def conn(role: str, node: str, member: str):
            return lambda: GroupConnection(role=role, group="g", node=node, member=member,
                                           side="secondary", secret=SECRET)

        def on_message(link, msg):
            self.received.append(msg)
            self.got.set()

        self.server = GroupServer(self.sup, ("127.0.0.1", 0), conn("master", "m1", "r-master"),
                                  lambda hello: None, self.links.append, on_message,
                                  lambda link, why: self.closed.append(why),
                                  tls=server_tls, tls_names=NODES)
        self.server.start()
        self.relay = Relay(self.server.sock.getsockname())
        self.client = GroupClient(self.sup, "test-group-client", [self.relay.address],
                                  conn("member", member_node, "r-b"),
                                  lambda link: self.member_up.set(), lambda link, msg: None,
                                  lambda link, why: None, tls=client_tls, tls_names=["m1"])
        self.client.start()

    def wait_error(self, words: str) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            err = self.client.last_error or ""
            if words in err:
                return err
            time.sleep(0.05)
        raise AssertionError(f"the member never reported {words!r} (last: "
                             f"{self.client.last_error!r})")

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()
        self.relay.close()
        self.sup.stop()


@pytest.fixture
def channel():
    made: list[Channel] = []

    def make(*args, **kwargs) -> Channel:
        ch = Channel(*args, **kwargs)
        made.append(ch)
        return ch

    yield make
    for ch in made:
        ch.stop()


def _send_probe(ch: Channel) -> None:
    assert ch.member_up.wait(20), f"the member never connected: {ch.client.last_error}"
    assert ch.client.send("resign", member="r-b", reason=PROBE)
    assert ch.got.wait(20), "the master never got the message"
    assert ch.received[-1]["reason"] == PROBE


def test_group_channel_over_tls_carries_messages_not_in_clear(pki, channel):
    ch = channel(lambda: _ctx(pki, pki["m1"], True), lambda: _ctx(pki, pki["b1"], False))
    _send_probe(ch)
    assert len(ch.relay.data) > 1000  # the TLS handshake and the messages went through it
    assert PROBE.encode() not in ch.relay.data
    assert b"r-master" not in ch.relay.data  # not even the HELLO is readable


def test_group_channel_in_plaintext_shows_the_message_on_the_wire(pki, channel):
    # The relay's own check: without TLS the probe is there to be read.
    ch = channel(None, None)
    _send_probe(ch)
    assert PROBE.encode() in ch.relay.data


def test_plaintext_member_is_refused_by_a_tls_master(pki, channel, caplog):
    caplog.set_level(logging.WARNING, logger="duplex.group")
    ch = channel(lambda: _ctx(pki, pki["m1"], True), None)
    ch.wait_error("requires TLS")
    assert not ch.member_up.is_set()
    assert "connected in plaintext" in caplog.text


def test_tls_member_is_refused_by_a_plaintext_master(pki, channel, caplog):
    caplog.set_level(logging.WARNING, logger="duplex.group")
    ch = channel(None, lambda: _ctx(pki, pki["b1"], False))
    ch.wait_error("answered in plaintext")
    assert "the peer speaks TLS" in caplog.text


def test_member_certificate_of_another_ca_is_refused(pki, channel, caplog):
    caplog.set_level(logging.WARNING, logger="duplex.group")
    ch = channel(lambda: _ctx(pki, pki["m1"], True),
                 lambda: _ctx(pki, pki["b1-rogue"], False, ca=pki["ca"]))
    ch.wait_error("refused our certificate")
    assert "not trusted" in caplog.text


def test_member_certificate_naming_a_node_outside_the_group_is_refused(pki, channel, caplog):
    caplog.set_level(logging.WARNING, logger="duplex.group")
    ch = channel(lambda: _ctx(pki, pki["m1"], True), lambda: _ctx(pki, pki["outsider"], False),
                 member_node="x9")
    err = ch.wait_error("refused your certificate")
    assert "'x9'" in err


def test_hello_claiming_another_node_than_the_certificate_is_refused(pki, channel):
    # b2's certificate is good, but the member's HELLO says b1.
    ch = channel(lambda: _ctx(pki, pki["m1"], True), lambda: _ctx(pki, pki["b2"], False),
                 member_node="b1")
    ch.wait_error("its certificate 'b2'")
    assert not ch.member_up.is_set()


def test_master_certificate_must_name_the_master_node(pki, channel):
    # The member dials m1; a master presenting b2's certificate is not m1.
    ch = channel(lambda: _ctx(pki, pki["b2"], True), lambda: _ctx(pki, pki["b1"], False))
    ch.wait_error("not node 'm1'")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_config(pki: dict[str, Cert], tmp: Path, b1_cert: str | None = None):
    """Resources r0 (m1, m2: the masters) and r1 (b1, b2) in group g, with
    tls; the endpoints on loopback."""
    from replicator.config import parse_config

    secret = tmp / "g.secret"
    secret.write_text("group-secret\n")
    secret.chmod(0o600)
    text = ""
    for res, nodes in (("r0", ("m1", "m2")), ("r1", ("b1", "b2"))):
        text += f'[resource.{res}]\nsecret-file = "{secret}"\n'
        for n in nodes:
            text += (f'[resource.{res}.on.{n}]\naddress = "127.0.0.1:{_free_port()}"\n'
                     f'device = "{tmp}/{n}.img"\nmeta-dir = "{tmp}/{n}"\n')
    text += (f'[group.g]\nresources = ["r0", "r1"]\nsecret-file = "{secret}"\n'
             f'tls = true\ntls-ca = "{pki["ca"].cert}"\n')
    for n in ("m1", "m2", "b1", "b2"):
        cert = pki[n].cert if n in pki else tmp / f"{n}-absent.pem"
        key = pki[n].key if n in pki else tmp / f"{n}-absent.key"
        if n == "b1" and b1_cert is not None:
            cert = b1_cert
        text += (f'[group.g.on.{n}]\naddress = "127.0.0.1:{_free_port()}"\n'
                 f'tls-cert = "{cert}"\ntls-key = "{key}"\n')
    return parse_config(text, str(tmp / "duplex.toml")).group("g")


def _side(group, resource: str, node: str):
    from replicator.group.side import GroupSide

    class Side(GroupSide):
        SIDE = "secondary"
        OTHER = "primary"

        def __init__(self) -> None:
            super().__init__(group, resource, node, ["m1", "m2"])
            self.up = threading.Event()

        def _on_link(self, link) -> None:
            self.up.set()

        def _on_message(self, link, msg) -> None:
            pass

        def _on_close(self, link, why) -> None:
            self.up.clear()

    return Side()


def test_group_sides_join_over_tls_from_the_group_table(pki, tmp_path):
    # side.py hands the group's tls keys to the channel: the master listens
    # in TLS, the member dials it in TLS.
    group = _group_config(pki, tmp_path)
    master, member = _side(group, "r0", "m1"), _side(group, "r1", "b1")
    master.start()
    try:
        member.start()
        try:
            assert member.up.wait(20), f"the member never joined: {member._client.last_error}"
            assert master.up.wait(20), "the master never saw the member"
            from replicator.tls import TlsSocket
            assert isinstance(member._client.link.sock, TlsSocket)
            assert all(isinstance(link.sock, TlsSocket) for link in master._server.links)
            assert master._server.links
        finally:
            member.stop()
    finally:
        master.stop()


def test_a_group_member_with_a_missing_certificate_cannot_join_naming_the_key(pki, tmp_path):
    from replicator.group.side import GroupStartError

    group = _group_config(pki, tmp_path, b1_cert=str(tmp_path / "gone.pem"))
    member = _side(group, "r1", "b1")
    with pytest.raises(GroupStartError) as e:
        member.start()
    assert f"group.g.on.b1.tls-cert: {tmp_path}/gone.pem does not exist" in str(e.value)
