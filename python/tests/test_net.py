"""VM tests of networking: listeners guest programs reach at host.internal,
dialing into the guest, guest ports exposed on the host, and TCP ``Conn``s
read and written from two threads at once. Run only with CC_RUN_VM_TESTS=1.

The guest is busybox: ``nc`` connects and listens (its ``wget`` is not
usable), ``httpd`` serves files.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

import crumblecracker as cc

from .test_vm import Interrupt

pytestmark = pytest.mark.vm

MIB = 1 << 20


def dial_when_ready(inst: cc.Instance, address: str, timeout: float = 20.0) -> cc.Conn:
    """Dials ADDRESS in the guest, again while nothing listens there yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return inst.dial("tcp", address)
        except cc.NetworkError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def fetch_when_ready(url: str, timeout: float = 20.0) -> tuple[int, bytes]:
    """GETs URL, again while the guest service does not answer yet (an
    exposed port accepts at once; the connection ends while nothing
    listens in the guest)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read()
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture
def listener(inst: cc.Instance) -> Iterator[cc.Listener]:
    with inst.listen("tcp", ":0") as lst:
        yield lst


# -- listeners -----------------------------------------------------------------


def test_listen_and_guest_nc(inst: cc.Instance, listener: cc.Listener) -> None:
    assert listener.addr == f"host.internal:{listener.port}"
    assert 0 < listener.port < 65536
    assert repr(listener) == f"<Listener 'host.internal:{listener.port}' open>"
    cmd = inst.command("sh", "-c", f"echo hello from the guest | nc host.internal {listener.port}")
    cmd.start()
    with listener.accept() as conn:
        assert conn.local_addr == f"127.0.0.254:{listener.port}"
        assert conn.remote_addr is not None and conn.remote_addr.startswith("127.0.0.1:")
        assert repr(conn) == (
            f"<Conn tcp local={conn.local_addr!r} remote={conn.remote_addr!r} open>"
        )
        assert conn.read(-1) == b"hello from the guest\n"
        conn.write(b"ignored")
    assert repr(conn).endswith(" closed>")
    assert cmd.wait() == 0
    listener.close()
    listener.close()  # idempotent
    assert repr(listener) == f"<Listener 'host.internal:{listener.port}' closed>"
    assert listener.port > 0  # still known
    with pytest.raises(cc.AlreadyClosedError) as info:
        listener.accept()
    assert info.value.op == "accept"
    # A closed listener refuses: the guest's nc fails.
    assert inst.command("sh", "-c", f"echo x | nc host.internal {listener.port}").run() != 0


def test_listen_on_a_chosen_port(inst: cc.Instance) -> None:
    with inst.listen("tcp", "host.internal:8099") as lst:
        assert (lst.addr, lst.port) == ("host.internal:8099", 8099)
        cmd = inst.command("sh", "-c", "echo chosen | nc host.internal 8099")
        cmd.start()
        with lst.accept() as conn:
            assert conn.read(-1) == b"chosen\n"
        assert cmd.wait() == 0
        with pytest.raises(cc.NetworkError):
            inst.listen("tcp", ":8099")  # taken in the guest
    with pytest.raises(cc.InvalidArgumentError):
        inst.listen("udp", ":0")
    with pytest.raises(cc.InvalidArgumentError):
        inst.listen("tcp", ":70000")
    with pytest.raises(cc.InvalidArgumentError):
        inst.listen("tcp", "nonsense")


def test_one_mib_each_way_from_two_threads(
    inst: cc.Instance, listener: cc.Listener, guest_dir: str
) -> None:
    to_guest = os.urandom(MIB)
    from_guest = os.urandom(MIB)
    inst.write_file(f"{guest_dir}/in", from_guest)
    cmd = inst.command(
        "sh", "-c", f"nc host.internal {listener.port} < {guest_dir}/in > {guest_dir}/out"
    )
    cmd.start()
    conn = listener.accept()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(0, len(to_guest), 64 << 10):
                conn.write(to_guest[i : i + (64 << 10)])
            conn.close_write()  # the guest's nc reads end of file
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer)
    t.start()
    received = conn.read(-1)  # on the main thread, while the other writes
    t.join(60)
    assert not t.is_alive(), "the writer is stuck"
    assert errors == []
    assert len(received) == MIB and received == from_guest
    assert cmd.wait() == 0
    assert inst.read_file(f"{guest_dir}/out") == to_guest
    with pytest.raises(cc.AlreadyClosedError):
        conn.write(b"after close_write")
    conn.close()


def test_close_ends_an_accept_in_another_thread(inst: cc.Instance) -> None:
    # Accepting on the main thread, closed from another.
    lst = inst.listen("tcp", ":0")
    timer = threading.Timer(0.5, lst.close)
    timer.start()
    start = time.monotonic()
    with pytest.raises(cc.AlreadyClosedError):
        lst.accept()
    assert time.monotonic() - start < 5
    timer.join()
    # Accepting on another thread, closed from the main thread.
    lst = inst.listen("tcp", ":0")
    raised: list[BaseException] = []

    def accept() -> None:
        try:
            lst.accept()
        except BaseException as e:
            raised.append(e)

    t = threading.Thread(target=accept)
    t.start()
    time.sleep(0.5)
    lst.close()
    t.join(5)
    assert not t.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], cc.AlreadyClosedError), raised


def test_ctrl_c_during_accept(inst: cc.Instance, listener: cc.Listener) -> None:
    with Interrupt(0.5) as intr, pytest.raises(KeyboardInterrupt):
        listener.accept()
    assert time.monotonic() - intr.sent_at < 3
    # Only the accept stopped: the listener still works. The accept is
    # bounded, so a connection that never comes fails the test, with what
    # the guest's nc said, instead of hanging it.
    cmd = inst.command("sh", "-c", f"echo again | nc host.internal {listener.port} 2>&1")
    out = cmd.stdout_pipe()
    cmd.start()
    token = cc.CancelToken()
    bound = threading.Timer(30, token.cancel)
    bound.start()
    try:
        conn = listener.accept(cancel=token)
    except cc.CancelledError:
        cmd.kill()
        pytest.fail(f"no connection within 30 s; nc said {out.read(-1)!r}")
    finally:
        bound.cancel()
    with conn:
        assert conn.read(-1) == b"again\n"
    assert cmd.wait() == 0


def test_interrupted_read_does_not_hold_up_writes(inst: cc.Instance, listener: cc.Listener) -> None:
    # A TCP echo through the guest: cmd stdin -> nc -> conn, conn -> nc -> cmd stdout.
    cmd = inst.command("nc", "host.internal", str(listener.port))
    stdin, stdout = cmd.stdin_pipe(), cmd.stdout_pipe()
    cmd.start()
    conn = listener.accept()
    with Interrupt(0.5), pytest.raises(KeyboardInterrupt):
        conn.read()  # keeps waiting in the background
    # The write direction does not wait for the interrupted read.
    wrote: list[int] = []
    t = threading.Thread(target=lambda: wrote.append(conn.write(b"to the guest")))
    t.start()
    t.join(10)
    assert not t.is_alive() and wrote == [12], "the write waited for the pending read"
    got = b""
    while len(got) < 12:
        got += stdout.read()
    assert got == b"to the guest"
    stdin.write(b"to the host")
    got = conn.read()  # what the interrupted read got
    while len(got) < 11:
        got += conn.read()
    assert got == b"to the host"
    conn.close()
    stdin.close()
    assert cmd.wait() == 0


def test_close_ends_a_read_in_another_thread(inst: cc.Instance, listener: cc.Listener) -> None:
    cmd = inst.command("sh", "-c", f"sleep 30 | nc host.internal {listener.port}")
    cmd.start()
    conn = listener.accept()
    result: list[object] = []

    def read() -> None:
        try:
            result.append(conn.read())
        except cc.CCError as e:
            result.append(e)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.3)
    conn.close()
    t.join(5)
    assert not t.is_alive()
    assert result == [b""] or isinstance(result[0], cc.AlreadyClosedError), result
    cmd.kill()
    cmd.wait()


# -- dial ----------------------------------------------------------------------


def test_dial(inst: cc.Instance) -> None:
    cmd = inst.command("sh", "-c", "echo hi | nc -l -p 7000")
    cmd.start()
    conn = dial_when_ready(inst, "127.0.0.1:7000")
    assert conn.remote_addr == "127.0.0.1:7000"
    assert conn.local_addr is not None
    assert conn.read(-1) == b"hi\n"
    conn.close()
    assert cmd.wait() == 0


def test_dial_write_and_close_write(inst: cc.Instance, guest_dir: str) -> None:
    cmd = inst.command("sh", "-c", f"nc -l -p 7002 > {guest_dir}/got; echo done")
    out = cmd.stdout_pipe()
    cmd.start()
    data = os.urandom(100_000)
    with dial_when_ready(inst, ":7002") as conn:
        assert conn.write(data) == len(data)
        conn.close_write()
        conn.close_write()  # again: fine
        assert conn.read(-1) == b""  # still readable: the guest closes
    assert out.read(-1) == b"done\n"
    assert cmd.wait() == 0
    assert inst.read_file(f"{guest_dir}/got") == data


def test_dial_errors(inst: cc.Instance) -> None:
    with pytest.raises(cc.NetworkError):
        inst.dial("tcp", "127.0.0.1:7999")  # nothing listens
    with pytest.raises(cc.InvalidArgumentError):
        inst.dial("tcp", "127.0.0.1:0")
    with pytest.raises(cc.InvalidArgumentError):
        inst.dial("tcp", "127.0.0.1:99999")
    with pytest.raises(TypeError):
        inst.dial("tcp", 7000)  # type: ignore[arg-type]


def test_pipes_have_no_addresses(inst: cc.Instance) -> None:
    cmd = inst.command("true")
    with cmd.stdout_pipe() as out:
        assert (out.local_addr, out.remote_addr) == (None, None)
        cmd.start()
        out.close_write()  # on an output pipe: nothing
        assert out.read(-1) == b""
    assert cmd.wait() == 0


# -- expose --------------------------------------------------------------------


@pytest.fixture
def httpd(inst: cc.Instance) -> Iterator[str]:
    """busybox httpd serving /tmp/www on the guest's 127.0.0.1:8081."""
    inst.mkdir_all("/tmp/www")
    inst.write_file("/tmp/www/index.html", b"<h1>hello from the guest</h1>\n")
    cmd = inst.command("httpd", "-f", "-p", "127.0.0.1:8081", "-h", "/tmp/www")
    cmd.start()
    yield "/tmp/www"
    cmd.kill()
    cmd.wait()


def test_expose_guest_httpd(inst: cc.Instance, httpd: str) -> None:
    with inst.expose(8081) as exposed:
        assert exposed.guest_port == 8081
        port = exposed.host_port
        assert 0 < port < 65536
        assert repr(exposed) == f"<ExposedPort 127.0.0.1:{port} -> guest port 8081 open>"
        status, body = fetch_when_ready(f"http://127.0.0.1:{port}/index.html")
        assert (status, body) == (200, b"<h1>hello from the guest</h1>\n")
        # Several connections, with http.client too.
        for _ in range(3):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/index.html")
            r = c.getresponse()
            assert (r.status, r.read()) == (200, body)
            c.close()
        with pytest.raises(cc.InvalidArgumentError):
            inst.expose(8081)  # the same guest port twice
    assert repr(exposed).endswith(" closed>")
    exposed.close()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # Unpublished, the guest port can be exposed again, at a chosen port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        chosen = s.getsockname()[1]
    with inst.expose(8081, chosen) as again:
        assert again.host_port == chosen
        assert fetch_when_ready(f"http://127.0.0.1:{chosen}/index.html")[0] == 200
        with socket.socket() as s, pytest.raises(OSError):
            s.bind(("127.0.0.1", chosen))  # it is bound on the host
        with pytest.raises(cc.NetworkError):
            inst.expose(8082, chosen)  # a host port in use


def test_expose_bad_ports(inst: cc.Instance) -> None:
    for args in [(-1,), (65536,), (80, -1), (80, 70000), (2**16 + 80,)]:
        with pytest.raises(cc.InvalidArgumentError):
            inst.expose(*args)
    with pytest.raises(cc.InvalidArgumentError):
        inst.expose(0)  # the library refuses guest port 0
    with pytest.raises(TypeError):
        inst.expose("8081")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        inst.expose(True)


# -- without a network interface -------------------------------------------------


def test_listen_and_dial_with_the_network_disabled(source: cc.ImageSource) -> None:
    options = cc.InstanceOptions(memory_mb=256, network=False)
    with cc.Instance(source, options) as inst:
        with inst.listen("tcp", ":0") as lst:
            cmd = inst.command("sh", "-c", f"echo offline | nc host.internal {lst.port}")
            cmd.start()
            with lst.accept() as conn:
                assert conn.read(-1) == b"offline\n"
            assert cmd.wait() == 0
        cmd = inst.command("sh", "-c", "echo inside | nc -l -p 7003")
        cmd.start()
        with dial_when_ready(inst, ":7003") as conn:
            assert conn.read(-1) == b"inside\n"
        assert cmd.wait() == 0


def test_instance_close_ends_accept(fresh: cc.Instance) -> None:
    lst = fresh.listen("tcp", ":0")
    timer = threading.Timer(0.5, fresh.close)
    timer.start()
    with pytest.raises((cc.NotRunningError, cc.AlreadyClosedError)):
        lst.accept()
    timer.join()
    lst.close()
    with pytest.raises(cc.AlreadyClosedError):
        fresh.listen("tcp", ":0")
    with pytest.raises(cc.AlreadyClosedError):
        fresh.dial("tcp", ":80")
    with pytest.raises(cc.AlreadyClosedError):
        fresh.expose(80)
