"""Only the right people clone, and nothing crosses the network in clear.

Real donors and recipients in processes, real keys, real SCRAM; a recording relay on
loopback stands for a capture of the traffic."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine import crypto
from engine import messages as M
from engine import protocol as P
from tests.helpers import CLI, ROOT, Donor, free_port, plain_peer, run_cli

PASSWORD = "s3cret-Pass-7b1e"
MARKER = b"MARKER-4fd2-only-in-a-file-of-the-donor"


def _users(tmp_path: Path, *users: tuple[str, bool]) -> Path:
    path = tmp_path / "users.json"
    for name, admin in users:
        args = ["user", "add", name, "--users", str(path)]
        if not admin:
            args.append("--no-backup-admin")
        res = run_cli(*args, input=PASSWORD + "\n")
        assert res.returncode == 0, res.stderr
    return path


def _source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret.txt").write_bytes(MARKER * 100)
    (src / "big").write_bytes(os.urandom(3 << 20))
    return src


def _pull(address: str, dest: Path, *extra: str, user: str = "alice",
          password: str | None = PASSWORD) -> object:
    env = {"CLONE_AGENT_PASSWORD": password} if password is not None else {}
    return run_cli("pull", f"{user}@{address}", "--data-dir", str(dest), "--json", *extra,
                   env=env, timeout=120)


def test_keygen_and_the_users_file(tmp_path: Path) -> None:
    res = run_cli("keygen", "--out", str(tmp_path / "donor"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("SHA256:")
    assert stat.S_IMODE(os.stat(tmp_path / "donor.key").st_mode) == 0o600
    again = run_cli("keygen", "--out", str(tmp_path / "donor"))
    assert again.returncode != 0 and "exists" in again.stderr  # never overwrites
    users = _users(tmp_path, ("alice", True), ("bob", False))
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    assert PASSWORD.encode() not in users.read_bytes()
    listed = json.loads(run_cli("user", "list", "--users", str(users), "--json").stdout)
    assert listed == [{"user": "alice", "backup_admin": True},
                      {"user": "bob", "backup_admin": False}]
    assert run_cli("user", "remove", "bob", "--users", str(users)).returncode == 0
    listed = json.loads(run_cli("user", "list", "--users", str(users), "--json").stdout)
    assert [u["user"] for u in listed] == ["alice"]


def test_serve_refuses_to_start_without_users(tmp_path: Path) -> None:
    res = run_cli("serve", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}", timeout=30)
    assert res.returncode == 2
    assert "--users" in res.stderr and "--allow-anonymous" in res.stderr
    assert "Traceback" not in res.stderr


def test_an_authenticated_encrypted_pinned_clone(tmp_path: Path) -> None:
    src = _source(tmp_path)
    users = _users(tmp_path, ("alice", True))
    fp = run_cli("keygen", "--out", str(tmp_path / "donor")).stdout.strip()
    dest = tmp_path / "dest"
    with Donor(src, "--users", str(users), "--key", str(tmp_path / "donor.key")) as donor:
        res = _pull(donor.address, dest, "--ssl-ca", str(tmp_path / "donor.pub"),
                    "--require-ssl")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["clone_status"]["encrypted"] is True
    assert summary["clone_status"]["donor_key"] == fp
    assert (dest / "secret.txt").read_bytes() == MARKER * 100
    assert (dest / "big").read_bytes() == (src / "big").read_bytes()
    assert "user 'alice' authenticated" in donor.stderr
    assert PASSWORD not in donor.stderr + res.stdout + res.stderr


@pytest.mark.parametrize("who", ["wrong password", "unknown user", "no password"])
def test_access_denied_is_one_message(who: str, tmp_path: Path) -> None:
    src = _source(tmp_path)
    users = _users(tmp_path, ("alice", True))
    dest = tmp_path / "dest"
    user, password = {"wrong password": ("alice", "nope"), "unknown user": ("mallory", "x"),
                      "no password": ("alice", None)}[who]
    with Donor(src, "--users", str(users)) as donor:
        res = _pull(donor.address, dest, user=user, password=password)
    using = "NO" if password is None else "YES"
    assert res.returncode == 6, res.stderr
    assert f"ERROR 1045 (28000): Access denied for user '{user}'@'" in res.stderr
    assert f"(using password: {using})" in res.stderr
    assert "Traceback" not in res.stderr
    assert not dest.exists()


def test_a_user_without_backup_admin(tmp_path: Path) -> None:
    src = _source(tmp_path)
    users = _users(tmp_path, ("bob", False))
    with Donor(src, "--users", str(users)) as donor:
        res = _pull(donor.address, tmp_path / "dest", user="bob")
    assert res.returncode == 6, res.stderr
    assert "ERROR 1227 (42000): Access denied; you need (at least one of) the " \
        "BACKUP_ADMIN privilege(s) for this operation" in res.stderr


def test_a_pin_that_does_not_match_writes_nothing(tmp_path: Path) -> None:
    src = _source(tmp_path)
    run_cli("keygen", "--out", str(tmp_path / "other"))
    dest = tmp_path / "dest"
    with Donor(src) as donor:
        res = _pull(donor.address, dest, "--ssl-ca", str(tmp_path / "other.pub"))
    assert res.returncode == 6, res.stderr
    assert "ERROR 2026 (HY000): SSL connection error: the donor's key" in res.stderr
    assert not dest.exists()


def test_require_secure_transport_refuses_a_plain_clone(tmp_path: Path) -> None:
    src = _source(tmp_path)
    with Donor(src, "--require-secure-transport") as donor:
        res = _pull(donor.address, tmp_path / "dest", "--require-no-ssl")
        ok = _pull(donor.address, tmp_path / "dest2")
    assert res.returncode == 6, res.stderr
    assert "ERROR 3159 (HY000): Connections using insecure transport are prohibited " \
        "while --require_secure_transport=ON." in res.stderr
    assert ok.returncode == 0, ok.stderr


class Recorder(threading.Thread):
    """A TCP relay on loopback that keeps every byte it passes, both ways: what a
    capture of the clone's traffic would hold."""

    def __init__(self, target: int) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.pipes: list[threading.Thread] = []

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        a.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = a.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self.lock:
                self.seen += data
            try:
                b.sendall(data)
            except OSError:
                break
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pipe, args=(a, b), daemon=True)
                t.start()
                self.pipes.append(t)

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        for t in self.pipes:
            t.join(5)
        self.listener.close()


@pytest.mark.parametrize("mode", ["encrypted", "plain"])
def test_what_a_capture_holds(mode: str, tmp_path: Path) -> None:
    """Encrypted: neither the password nor a file's contents; plain (the control that
    the capture sees the data): the contents, but still never the password (SCRAM)."""
    src = _source(tmp_path)
    users = _users(tmp_path, ("alice", True))
    with Donor(src, "--users", str(users)) as donor:
        relay = Recorder(donor.port)
        relay.start()
        try:
            extra = ["--require-ssl"] if mode == "encrypted" else ["--require-no-ssl"]
            res = _pull(f"127.0.0.1:{relay.port}", tmp_path / "dest", *extra)
        finally:
            relay.close()
    assert res.returncode == 0, res.stderr
    captured = bytes(relay.seen)
    assert len(captured) > 3 << 20
    assert PASSWORD.encode() not in captured
    assert (MARKER in captured) == (mode == "plain")
    assert (b"secret.txt" in captured) == (mode == "plain")  # names too


def test_a_stranger_cannot_attach_to_a_running_clone(tmp_path: Path) -> None:
    """ATTACH needs the clone's secret, which only the authenticated master received:
    a guessed clone id gets an error and not a byte, and the clone goes on."""
    src = _source(tmp_path)
    (src / "more").write_bytes(os.urandom(8 << 20))
    dest = tmp_path / "dest"
    with Donor(src) as donor:
        pull = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest),
                                 "--max-data-bandwidth", "4", "--max-concurrency", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT)
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            deadline = time.monotonic() + 30
            while not (dest / "#clone").exists() and time.monotonic() < deadline:
                time.sleep(0.02)  # waiting for the clone to start, bounded
            assert pull.poll() is None, "the clone ended before the stranger came"
            sock.connect(f"tcp://{donor.address}")
            hello = crypto.Initiator()
            sock.send_multipart(P.command(P.HELLO, M.Hello(
                P.PROTOCOL_VERSION, crypto.b64(hello.hello)).to_body()))
            assert sock.poll(10000)
            reply = M.HelloReply.from_body(P.decode(sock.recv_multipart(), P.RESP).body)
            keys = hello.finish(reply.e, reply.s, reply.confirm, None)
            cipher = crypto.ControlCipher(keys.r2d, keys.d2r)
            sock.send_multipart(P.command(P.ATTACH, M.Attach(1, 1).to_body(), cipher))
            assert sock.poll(10000)
            answer = P.decode(sock.recv_multipart(), P.RESP, cipher)
            assert answer.kind == P.ERROR and answer.body["error_no"] == 3863, answer
            assert not sock.poll(500)  # and nothing more: no data, no manifest
            _, err = pull.communicate(timeout=120)
        finally:
            sock.close()
            ctx.term()
            if pull.poll() is None:
                pull.kill()
                pull.communicate(timeout=30)
    assert pull.returncode == 0, err
    assert (dest / "more").read_bytes() == (src / "more").read_bytes()


class Impostor(threading.Thread):
    """A man in the middle that speaks the protocol: it answers the recipient's HELLO
    with a key of its own (the recipient pinned nothing), makes its own handshake with
    the real donor, and relays every message, opened and sealed again on each side."""

    def __init__(self, donor_port: int) -> None:
        super().__init__(daemon=True)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.front = self.ctx.socket(zmq.ROUTER)
        self.front.setsockopt(zmq.LINGER, 0)
        self.port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.donor_port = donor_port
        self.key = crypto.StaticKey.generate()
        self.stop = threading.Event()
        self.relayed: list[str] = []

    def run(self) -> None:
        back = self.ctx.socket(zmq.DEALER)
        back.setsockopt(zmq.LINGER, 0)
        back.connect(f"tcp://127.0.0.1:{self.donor_port}")
        ident = b""
        front_cipher = back_cipher = None
        try:
            while not self.stop.is_set():
                if self.front.poll(50):
                    ident, *frames = self.front.recv_multipart()
                    msg = P.decode(frames, P.CMD, front_cipher)
                    self.relayed.append(msg.name)
                    if msg.kind == P.HELLO:
                        hello = M.Hello.from_body(msg.body)
                        e_pub, confirm, keys = crypto.respond(self.key, hello.e)
                        front_cipher = crypto.ControlCipher(keys.d2r, keys.r2d)
                        mine = crypto.Initiator()
                        back.send_multipart(P.command(P.HELLO, M.Hello(
                            P.PROTOCOL_VERSION, crypto.b64(mine.hello)).to_body()))
                        assert back.poll(10000)
                        real = M.HelloReply.from_body(
                            P.decode(back.recv_multipart(), P.RESP).body)
                        bk = mine.finish(real.e, real.s, real.confirm, None)
                        back_cipher = crypto.ControlCipher(bk.r2d, bk.d2r)
                        reply = M.HelloReply(P.PROTOCOL_VERSION, real.auth, crypto.b64(e_pub),
                                             crypto.b64(self.key.public), crypto.b64(confirm))
                        self.front.send_multipart([ident, *P.response(
                            P.HELLO_REPLY, reply.to_body())])
                    else:
                        back.send_multipart(P.command(msg.kind, msg.body, back_cipher))
                if back.poll(0):
                    answer = P.decode(back.recv_multipart(), P.RESP, back_cipher)
                    self.relayed.append(answer.name)
                    self.front.send_multipart([ident, *P.response(
                        answer.kind, answer.body, answer.payload, front_cipher)])
        finally:
            back.close()

    def close(self) -> None:
        self.stop.set()
        self.join(10)
        self.front.close()
        self.ctx.term()


def test_a_relay_in_the_middle_cannot_complete_an_authenticated_clone(tmp_path: Path
                                                                       ) -> None:
    src = _source(tmp_path)
    users = _users(tmp_path, ("alice", True))
    dest = tmp_path / "dest"
    with Donor(src, "--users", str(users)) as donor:
        impostor = Impostor(donor.port)
        impostor.start()
        try:
            res = _pull(f"127.0.0.1:{impostor.port}", dest)
        finally:
            impostor.close()
    # The proof was bound to the recipient's handshake with the impostor: the donor,
    # whose handshake was another, refuses it.
    assert "AUTH" in impostor.relayed, impostor.relayed
    assert res.returncode == 6, res.stderr
    assert "ERROR 1045 (28000): Access denied for user 'alice'" in res.stderr
    assert "FILES" not in impostor.relayed and "DATA_DESC" not in impostor.relayed
    assert not dest.exists()
    assert "failed authentication for user 'alice'" in donor.stderr


def test_a_directory_swapped_for_a_link_is_not_followed(tmp_path: Path) -> None:
    """The donor reads beneath its directory: a directory replaced by a link to
    somewhere else after the scan fails the clone, and nothing from outside arrives."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(os.urandom(6 << 20))
    (src / "z").write_bytes(os.urandom(6 << 20))  # read first: the swap happens meanwhile
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_bytes(MARKER * (6 << 20 // len(MARKER)))
    os.chmod(outside / "f", 0o600)
    dest = tmp_path / "dest"
    with Donor(src) as donor:
        pull = subprocess.Popen([*CLI, "pull", f"u@{donor.address}", "--data-dir", str(dest),
                                 "--max-data-bandwidth", "2", "--max-concurrency", "1",
                                 "--require-no-ssl"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while not (dest / "#clone").exists() and time.monotonic() < deadline:
                time.sleep(0.02)  # until the clone runs (the scan is done), bounded
            os.rename(src / "d", tmp_path / "d-away")
            os.symlink(outside, src / "d")
            _, err = pull.communicate(timeout=120)
        finally:
            if pull.poll() is None:
                pull.kill()
                pull.communicate(timeout=30)
    # "z" (6 MiB at 2 MiB/s) goes first: "d/f" is read well after the swap
    assert pull.returncode == 1, err
    assert "cannot read 'd/f' on the donor" in err, err
    assert "Traceback" not in err
    assert not dest.exists()


def test_idle_connections_and_a_huge_frame_do_not_hold_the_donor(tmp_path: Path) -> None:
    """300 connections that finish their handshake and then say nothing, and one frame
    far over the limit: the donor's memory stays bounded, it keeps at most its cap of
    waiting connections, and a real clone succeeds beside them."""
    src = _source(tmp_path)
    ctx: zmq.Context[Any] = zmq.Context()
    socks = []
    try:
        with Donor(src) as donor:
            assert donor.proc is not None
            before = _peak_rss(donor.proc.pid)
            for _ in range(300):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://{donor.address}")
                hello = crypto.Initiator()
                sock.send_multipart(P.command(P.HELLO, M.Hello(
                    P.PROTOCOL_VERSION, crypto.b64(hello.hello)).to_body()))
                socks.append(sock)
            for sock in socks:
                assert sock.poll(10000)
                assert P.decode(sock.recv_multipart(), P.RESP).kind == P.HELLO_REPLY
            huge = ctx.socket(zmq.DEALER)
            huge.setsockopt(zmq.LINGER, 0)
            huge.connect(f"tcp://{donor.address}")
            socks.append(huge)
            huge.send_multipart([b"CA\x02\x00\x01\x00\x00\x00", bytes(64 << 20)])
            # Refused as it arrives (ZMQ_MAXMSGSIZE): its connection is dropped, so no
            # answer comes; a donor that took it whole would answer ERROR 3863.
            assert not huge.poll(3000), "the donor read a 64 MiB frame"
            peak = _peak_rss(donor.proc.pid) - before
            res = _pull(donor.address, tmp_path / "dest", "--require-ssl")
        assert res.returncode == 0, res.stderr
        assert peak < 32 << 20, f"the donor's peak memory grew by {peak >> 20} MiB"
    finally:
        for sock in socks:
            sock.close()
        ctx.term()


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_pings_alone_do_not_hold_the_one_clone_slot(tmp_path: Path) -> None:
    """A recipient that starts a clone and then only pings (empty ACKs) loses it after
    the donor's idle timeout: the next clone is served, not refused with 3634."""
    src = _source(tmp_path)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with Donor(src, "--idle-timeout", "2") as donor:
            peer = plain_peer(ctx, donor.address)
            peer.send_multipart(P.command(P.INIT, M.Init(P.PROTOCOL_VERSION, "u").to_body()))
            assert peer.poll(10000)
            cfg = P.decode(peer.recv_multipart(), P.RESP)
            assert cfg.kind == P.CONFIG
            deadline = time.monotonic() + 30
            res = None
            while time.monotonic() < deadline:
                peer.send_multipart(P.command(P.ACK, M.Ack(cfg.body["clone_id"], [], 0)
                                              .to_body()))
                res = _pull(donor.address, tmp_path / "dest", "--connect-timeout", "3")
                if res.returncode == 0 or "ERROR 3634" not in res.stderr:
                    break
            assert res is not None and res.returncode == 0, res.stderr
            peer.close()
        assert "recipient silent for" in donor.stderr  # pings did not count
    finally:
        ctx.term()
