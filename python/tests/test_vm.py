"""VM tests: real instances booted from the busybox test image pulled from a
local registry. Run only with CC_RUN_VM_TESTS=1 (see conftest.py)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import crumblecracker as cc

from .conftest import kernel_has_9p

pytestmark = pytest.mark.vm


class Interrupt:
    """Sends SIGINT to this process after DELAY seconds (as Ctrl-C does)."""

    def __init__(self, delay: float) -> None:
        self.sent_at = 0.0
        self.timer = threading.Timer(delay, self._fire)

    def _fire(self) -> None:
        self.sent_at = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> Interrupt:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()


def running_processes(inst: cc.Instance, pattern: str) -> list[str]:
    out = inst.command("ps", "-o", "pid,args").output().decode()
    return [line for line in out.splitlines() if pattern in line and "ps -o" not in line]


# -- identity and lifecycle ----------------------------------------------------


def test_instance_identity(inst: cc.Instance) -> None:
    assert isinstance(inst.id, str) and inst.id
    assert inst.is_running
    assert repr(inst) == f"<Instance {inst.id!r} open>"


def test_close_is_idempotent_and_later_calls_fail(fresh: cc.Instance) -> None:
    inst_id = fresh.id
    f = fresh.create("/tmp/open-at-close")
    cmd = fresh.command("true")
    fresh.close()
    fresh.close()
    assert fresh.closed and not fresh.is_running
    assert fresh.id == inst_id
    assert repr(fresh) == f"<Instance {inst_id!r} closed>"
    calls: list[tuple[str, Callable[[], object]]] = [
        ("read_file", lambda: fresh.read_file("/etc/passwd")),
        ("command", lambda: fresh.command("true")),
        ("stat", lambda: fresh.stat("/")),
        ("wait", fresh.wait),
        ("snapshot_filesystem", fresh.snapshot_filesystem),
    ]
    for op, call in calls:
        with pytest.raises(cc.AlreadyClosedError) as info:
            call()
        assert info.value.op == op and info.value.code == 4
    # Objects of a closed instance report it too.
    with pytest.raises(cc.AlreadyClosedError):
        f.write(b"x")
    with pytest.raises(cc.AlreadyClosedError):
        cmd.run()
    f.close()
    f.close()
    cmd.close()


def test_timeout_ends_the_instance(source: cc.ImageSource) -> None:
    with cc.Instance(source, cc.InstanceOptions(memory_mb=256, timeout_seconds=2)) as inst:
        assert inst.command("true").run() == 0
        start = time.monotonic()
        inst.wait()
        assert time.monotonic() - start < 10
        assert not inst.is_running
        with pytest.raises(cc.NotRunningError) as info:
            inst.read_file("/etc/passwd")
        assert info.value.code == 3
        with pytest.raises(cc.NotRunningError):
            inst.command("true").run()


def test_pause_stops_guest_time_and_outlives_the_timeout(source: cc.ImageSource) -> None:
    with cc.Instance(source, cc.InstanceOptions(memory_mb=256, timeout_seconds=3)) as inst:
        uptime = "cut -d' ' -f1 /proc/uptime"
        before = float(inst.command("sh", "-c", uptime).output())
        inst.pause()
        inst.pause()  # idempotent
        assert inst.is_paused and inst.is_running
        start = time.monotonic()
        with pytest.raises(cc.PausedError) as info:
            inst.command("true").run()
        assert info.value.code == cc.ErrorCode.PAUSED
        assert time.monotonic() - start < 2, "a request while paused fails at once"
        time.sleep(4)  # longer than timeout_seconds
        assert inst.is_running, "paused time does not count towards the timeout"
        inst.resume()
        assert not inst.is_paused
        after = float(inst.command("sh", "-c", uptime).output())
        assert after - before < 2.5, f"guest time moved {after - before:.2f} s in a 4 s pause"
        start = time.monotonic()
        inst.wait()  # the time it had left runs out
        assert time.monotonic() - start < 10
    with pytest.raises(cc.AlreadyClosedError):
        inst.pause()
    assert not inst.is_paused


def test_disk_mb_bounds_the_writable_layer(source: cc.ImageSource) -> None:
    with cc.Instance(source, cc.InstanceOptions(memory_mb=256, disk_mb=96)) as inst:
        out = inst.command("sh", "-c", "dd if=/dev/zero of=/fill bs=1M 2>&1; echo status=$?")
        text = out.output().decode()
        assert "No space left on device" in text and "status=0" not in text, text
        size = int(inst.command("sh", "-c", "stat -c %s /fill").output())
        assert 64 << 20 < size <= 96 << 20


def test_warm_start_and_cold_start(source: cc.ImageSource) -> None:
    options = cc.InstanceOptions(memory_mb=288)
    with cc.Instance(source, options) as first:
        assert first.start_kind in (cc.StartKind.BUILT, cc.StartKind.WARM)
    with cc.Instance(source, options) as a, cc.Instance(source, options) as b:
        assert (a.start_kind, b.start_kind) == (cc.StartKind.WARM, cc.StartKind.WARM)
        a.write_file("/tmp/who", b"a")
        b.write_file("/tmp/who", b"b")
        assert (a.read_file("/tmp/who"), b.read_file("/tmp/who")) == (b"a", b"b")
        rng = "head -c 32 /dev/urandom | od -An -tx1"
        assert a.command("sh", "-c", rng).output() != b.command("sh", "-c", rng).output()
        guest = int(a.command("date", "+%s").output())
        assert abs(guest - time.time()) <= 2
        assert a.start_kind == cc.StartKind.WARM  # still known
    options.warm_start = False
    with cc.Instance(source, options) as cold:
        assert cold.start_kind == cc.StartKind.COLD
        assert cold.command("echo", "ok").output() == b"ok\n"


def test_park_and_restore_twice(source: cc.ImageSource, tmp_path: Path) -> None:
    counter = (
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done)"
        " </dev/null >/dev/null 2>&1 &"
    )
    park = tmp_path / "parked"
    inst = cc.Instance(source, cc.InstanceOptions(memory_mb=256))
    inst.command("sh", "-c", counter).run()
    inst.write_file("/etc/marker", b"kept")
    time.sleep(0.5)
    before = int(inst.read_file("/tmp/c"))
    assert inst.park(park) > 0
    assert not inst.is_running
    with pytest.raises(cc.AlreadyClosedError):
        inst.command("true").run()
    with cc.Instance.restore(park) as a, cc.Instance.restore(park, timeout_seconds=600) as b:
        assert a.start_kind == cc.StartKind.RESTORED
        assert a.id != b.id and a.id != inst.id
        for r in (a, b):
            assert int(r.read_file("/tmp/c")) >= before
            assert r.read_file("/etc/marker") == b"kept"
        a.write_file("/etc/marker", b"a")
        assert b.read_file("/etc/marker") == b"kept"
    with pytest.raises(cc.InvalidArgumentError, match="not a parked instance"):
        cc.Instance.restore(tmp_path)
    with pytest.raises(cc.InvalidArgumentError):
        cc.Instance.restore(park, timeout_seconds=0)


def test_branch_into_two(source: cc.ImageSource) -> None:
    with cc.Instance(source, cc.InstanceOptions(memory_mb=256)) as inst:
        inst.write_file("/etc/marker", b"before")
        with pytest.raises(cc.InvalidArgumentError):
            inst.branch(0)
        kids = inst.branch(2)
        try:
            assert len(kids) == 2 and len({inst.id, kids[0].id, kids[1].id}) == 3
            kids[0].write_file("/etc/marker", b"child")
            assert kids[1].read_file("/etc/marker") == b"before"
            assert inst.read_file("/etc/marker") == b"before"
            assert kids[1].start_kind == cc.StartKind.RESTORED
        finally:
            for k in kids:
                k.close()


def test_network_switch(source: cc.ImageSource) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                received.append(conn.recv(16))

    thread = threading.Thread(target=serve)
    thread.start()
    probe = f"echo hi | timeout 10 nc -w 3 10.0.2.2 {port}; true"
    try:
        # By default the guest cannot reach the host's services.
        with cc.Instance(source, cc.InstanceOptions(memory_mb=256)) as inst:
            refused = inst.command("sh", "-c", probe).combined_output()
            assert b"refused" in refused, refused
            time.sleep(0.5)
            assert received == [], "the host was reached under the default policy"
        allow = cc.NetworkPolicy(allow_host=True)
        with cc.Instance(source, cc.InstanceOptions(memory_mb=256, network_policy=allow)) as inst:
            inst.command("sh", "-c", probe).run()
            time.sleep(0.5)
            assert received == [b"hi\n"]
            inst.set_network_enabled(False)
            inst.command("sh", "-c", probe).run()
            time.sleep(0.5)
            assert received == [b"hi\n"], "a connection left with the network off"
    finally:
        stop.set()
        thread.join()
        server.close()
    with cc.Instance(source, cc.InstanceOptions(memory_mb=256, network=False)) as inst:
        with pytest.raises(cc.InvalidArgumentError):
            inst.set_network_enabled(True)


def test_close_from_another_thread_ends_wait(fresh: cc.Instance) -> None:
    threading.Timer(0.5, fresh.close).start()
    start = time.monotonic()
    with pytest.raises(cc.AlreadyClosedError):
        fresh.wait()
    assert time.monotonic() - start < 10


# -- dead and deaf guests -------------------------------------------------------

#: How long a death may take to be noticed (the heartbeat's answer timeout
#: plus its ping interval).
NOTICED = 2.0


def in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Runs CALL in a thread; the list gets its result or exception."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call())
        except Exception as e:  # the test inspects it
            result.append(e)
        result.append(time.monotonic())

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


@pytest.mark.parametrize(
    "trigger",
    [
        "poweroff -f",
        "halt -f",
        "cd /sys/bus/virtio/drivers/virtio_console && for d in virtio*; do echo $d > unbind; done",
    ],
    ids=["poweroff-f", "halt-f", "unbind-virtio-console"],
)
def test_dead_or_deaf_guest_is_noticed(fresh: cc.Instance, trigger: str) -> None:
    long = fresh.command("sleep", "1000")
    long.start()
    waiter, waited = in_thread(long.wait)
    fresh.command("sh", "-c", trigger).start()
    triggered = time.monotonic()
    waiter.join(timeout=60)
    error, when = waited
    assert isinstance(error, cc.NotRunningError), error
    assert isinstance(when, float) and when - triggered < NOTICED
    assert not fresh.is_running
    start = time.monotonic()
    with pytest.raises(cc.NotRunningError, match="stopped answering"):
        fresh.command("true").run()
    with pytest.raises(cc.NotRunningError):
        fresh.read_file("/etc/passwd")
    assert time.monotonic() - start < 0.5
    start = time.monotonic()
    fresh.close()
    assert time.monotonic() - start < NOTICED


def test_agent_shutdown_is_not_running_not_success(fresh: cc.Instance) -> None:
    waiting = fresh.command("sleep", "1000")
    waiting.start()
    runner, ran = in_thread(fresh.command("sleep", "1000").run)
    capturer, captured = in_thread(fresh.command("sh", "-c", "echo partial; sleep 1000").output)
    time.sleep(0.5)  # both started
    fresh.command("kill", "-TERM", "1").start()
    with pytest.raises(cc.NotRunningError, match="shut down"):
        waiting.wait()
    for thread, result in ((runner, ran), (capturer, captured)):
        thread.join(timeout=30)
        assert isinstance(result[0], cc.NotRunningError), result
    assert not fresh.is_running


def test_close_under_readers_is_already_closed(fresh: cc.Instance) -> None:
    cmd = fresh.command("sh", "-c", "echo first; sleep 1000")
    out = cmd.stdout_pipe()
    cmd.start()
    assert out.read(64) == b"first\n"
    listener = fresh.listen("tcp", ":0")
    calls = [in_thread(lambda: out.read(64)), in_thread(cmd.wait), in_thread(listener.accept)]
    time.sleep(0.3)
    fresh.close()
    for thread, result in calls:
        thread.join(timeout=30)
        assert isinstance(result[0], cc.AlreadyClosedError), result


def test_fork_bomb_timeout_fires_on_time(fresh: cc.Instance) -> None:
    cmd = fresh.command("sh", "-c", "f() { f | f & }; f; sleep 1000").set_timeout(5)
    start = time.monotonic()
    with pytest.raises(cc.TimeoutError):
        cmd.output()
    assert 5 <= time.monotonic() - start < 7


def test_instance_accepts_only_sources(lib: None) -> None:
    with pytest.raises(TypeError):
        cc.Instance("alpine:latest")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cc.Instance(None)  # type: ignore[arg-type]


# -- cancel tokens ---------------------------------------------------------------


def cancelled_from_another_thread(op: str, call: Callable[[cc.CancelToken], object]) -> None:
    """Runs CALL with a fresh token in a thread, checks it blocks, cancels
    the token from here and checks CALL raised ``CancelledError`` naming OP,
    promptly (a generous bound: not a hang)."""
    with cc.CancelToken() as token:
        thread, result = in_thread(lambda: call(token))
        time.sleep(0.3)
        assert not result, f"{op} did not block: {result}"
        cancelled = time.monotonic()
        token.cancel()
        thread.join(timeout=2)
        assert not thread.is_alive(), f"{op} still blocked 2 s after the cancel"
        error, ended = result
        assert isinstance(error, cc.CancelledError), f"{op}: {error!r}"
        assert str(error) == f"{op} cancelled"
        assert isinstance(ended, float) and ended - cancelled < 2


def test_every_blocking_call_is_cancelled_from_another_thread(inst: cc.Instance) -> None:
    cancelled_from_another_thread("wait", lambda t: inst.wait(cancel=t))
    with inst.listen("tcp", ":0") as listener:
        cancelled_from_another_thread("accept", lambda t: listener.accept(cancel=t))
    with inst.command("sleep", "1000") as cmd:
        stdin, stdout = cmd.stdin_pipe(), cmd.stdout_pipe()
        cmd.start()
        cancelled_from_another_thread("wait", lambda t: cmd.wait(cancel=t))
        cancelled_from_another_thread("read", lambda t: stdout.read(64, cancel=t))
        big = b"x" * (8 << 20)  # past the window and the guest pipe's buffer
        cancelled_from_another_thread("write", lambda t: stdin.write(big, cancel=t))
        cmd.kill()
    inst.command("sh", "-c", "rm -f /tmp/pyfifo; mkfifo /tmp/pyfifo").run()
    with inst.command("sh", "-c", "exec 3>/tmp/pyfifo; sleep 1000") as holder:
        holder.start()
        with inst.open("/tmp/pyfifo") as f:
            cancelled_from_another_thread("read", lambda t: f.read(64, cancel=t))
        holder.kill()
    inst.command("truncate", "-s", "1000M", "/tmp/pybig").run()
    cancelled_from_another_thread("read_file", lambda t: inst.read_file("/tmp/pybig", cancel=t))
    inst.command("rm", "-f", "/tmp/pybig").run()
    inst.command("sh", "-c", "rm -f /tmp/pyfifo-w; mkfifo /tmp/pyfifo-w").run()
    with inst.command("sh", "-c", "exec 3</tmp/pyfifo-w; sleep 1000") as reader:
        reader.start()
        cancelled_from_another_thread(
            "write_file", lambda t: inst.write_file("/tmp/pyfifo-w", big, cancel=t)
        )
        reader.kill()
    assert inst.command("echo", "still here").output() == b"still here\n"


# -- filesystem ----------------------------------------------------------------


def test_write_and_read_files(inst: cc.Instance, guest_dir: str) -> None:
    p = f"{guest_dir}/hello.txt"
    inst.write_file(p, b"Hello, World!")
    assert inst.read_file(p) == b"Hello, World!"
    inst.write_file(p, "héllo\n")  # str: UTF-8
    assert inst.read_file(p) == "héllo\n".encode()
    inst.write_file(p, bytearray(b"\x00\x01\xff"), mode=0o600)
    assert inst.read_file(p) == b"\x00\x01\xff"
    info = inst.stat(p)
    assert (info.name, info.size, info.permissions, info.is_dir, info.is_symlink) == (
        "hello.txt",
        3,
        0o600,
        False,
        False,
    )
    assert isinstance(info.mtime, float)
    inst.write_file(f"{guest_dir}/empty", b"")
    assert inst.read_file(f"{guest_dir}/empty") == b""
    with pytest.raises(TypeError):
        inst.write_file(p, 42)  # type: ignore[arg-type]


def test_large_file_round_trip(inst: cc.Instance, guest_dir: str) -> None:
    data = os.urandom(8 << 20)
    p = f"{guest_dir}/big"
    inst.write_file(p, data)
    assert inst.stat(p).size == len(data)
    assert inst.read_file(p) == data
    with inst.open(p) as f:
        assert f.read() == data


def test_directories(inst: cc.Instance, guest_dir: str) -> None:
    inst.mkdir(f"{guest_dir}/d", 0o700)
    assert inst.stat(f"{guest_dir}/d").is_dir
    assert inst.stat(f"{guest_dir}/d").permissions == 0o700
    inst.mkdir_all(f"{guest_dir}/a/b/c")
    inst.mkdir_all(f"{guest_dir}/a/b/c")  # existing: fine
    inst.write_file(f"{guest_dir}/a/b/file", b"x")
    entries = inst.read_dir(guest_dir)
    assert [(e.name, e.is_dir) for e in entries] == [("a", True), ("d", True)]
    assert all(isinstance(e, cc.DirEntry) for e in entries)
    assert [e.name for e in inst.read_dir(f"{guest_dir}/a/b")] == ["c", "file"]
    inst.remove(f"{guest_dir}/d")
    with pytest.raises(cc.IOError):
        inst.remove(f"{guest_dir}/a")  # not empty
    inst.remove_all(f"{guest_dir}/a")
    inst.remove_all(f"{guest_dir}/a")  # missing: fine
    assert inst.read_dir(guest_dir) == []
    with pytest.raises(cc.IOError):
        inst.mkdir(f"{guest_dir}/no/parent")


def test_rename_symlink_readlink_lstat(inst: cc.Instance, guest_dir: str) -> None:
    inst.write_file(f"{guest_dir}/a", b"data")
    inst.rename(f"{guest_dir}/a", f"{guest_dir}/b")
    assert inst.read_file(f"{guest_dir}/b") == b"data"
    inst.symlink("b", f"{guest_dir}/link")
    assert inst.readlink(f"{guest_dir}/link") == "b"
    assert inst.read_file(f"{guest_dir}/link") == b"data"
    assert inst.stat(f"{guest_dir}/link").is_symlink is False
    assert inst.stat(f"{guest_dir}/link").size == 4
    link = inst.lstat(f"{guest_dir}/link")
    assert link.is_symlink and link.name == "link"
    entries = {e.name: e for e in inst.read_dir(guest_dir)}
    assert entries["link"].mode & 0o170000 == 0o120000
    with pytest.raises(cc.IOError):
        inst.readlink(f"{guest_dir}/b")  # not a link


def test_chmod_chown_chtimes(inst: cc.Instance, guest_dir: str) -> None:
    p = f"{guest_dir}/f"
    inst.write_file(p, b"x")
    inst.chmod(p, 0o640)
    assert inst.stat(p).permissions == 0o640
    inst.chown(p, 1000, 1000)
    info = inst.stat(p)
    assert (info.uid, info.gid) == (1000, 1000)
    inst.chown(p, -1, 0)
    info = inst.stat(p)
    assert (info.uid, info.gid) == (1000, 0)
    inst.chtimes(p, 1_600_000_000, 1_700_000_000.25)
    assert inst.stat(p).mtime == pytest.approx(1_700_000_000.25, abs=1e-6)
    with pytest.raises(cc.InvalidArgumentError):
        inst.chmod(p, 0o10000)


def test_missing_file_is_io_error_with_path(inst: cc.Instance) -> None:
    with pytest.raises(cc.IOError) as info:
        inst.stat("/no/such/file")
    e = info.value
    assert (e.code, e.op, e.path) == (cc.ErrorCode.IO, "stat", "/no/such/file")
    assert "No such file" in e.message
    with pytest.raises(cc.IOError) as info:
        inst.read_file("/no/such/file")
    assert info.value.path == "/no/such/file"
    with pytest.raises(cc.IOError) as info:
        inst.remove("/no/such/file")
    assert (info.value.op, info.value.path) == ("remove", "/no/such/file")


def test_guest_errnos_are_oserrors(inst: cc.Instance) -> None:
    # Python's own file errors, with the guest's errno, and still cc.IOError.
    with pytest.raises(FileNotFoundError) as nf:
        inst.read_file("/no/such/file")
    with pytest.raises(FileExistsError) as ex:
        inst.mkdir("/tmp")
    with pytest.raises(NotADirectoryError) as nd:
        inst.write_file("/etc/passwd/x", b"x")
    with pytest.raises(IsADirectoryError) as isdir:
        inst.read_file("/tmp")
    # A read-only sysctl: refused even to the guest's root.
    with pytest.raises(PermissionError) as perm:
        inst.write_file("/proc/sys/kernel/ostype", b"x")
    mount = "mkdir -p /tmp/full && mount -t tmpfs -o size=64k tmpfs /tmp/full"
    assert inst.command("sh", "-c", mount).run() == 0
    try:
        with pytest.raises(OSError) as full:
            inst.write_file("/tmp/full/f", bytes(1 << 20))
    finally:
        assert inst.command("sh", "-c", "umount /tmp/full && rmdir /tmp/full").run() == 0
    cases = [
        (nf, errno.ENOENT, "/no/such/file"),
        (ex, errno.EEXIST, "/tmp"),
        (nd, errno.ENOTDIR, "/etc/passwd/x"),
        (isdir, errno.EISDIR, "/tmp"),
        (perm, errno.EACCES, "/proc/sys/kernel/ostype"),
        (full, errno.ENOSPC, "/tmp/full/f"),
    ]
    for info, number, path in cases:
        e = info.value
        assert isinstance(e, cc.IOError) and isinstance(e, cc.CCError), repr(e)
        assert (e.errno, e.strerror, e.filename) == (number, os.strerror(number), path), repr(e)
        assert (e.code, e.path) == (cc.ErrorCode.IO, path)
    assert type(full.value) is cc.IOError, "ENOSPC has no builtin subclass"
    try:
        inst.read_file("/no/such/file")
    except cc.IOError as e:
        assert e.errno == errno.ENOENT
    else:
        pytest.fail("no error")


def test_guest_paths_accept_pathlike(inst: cc.Instance, guest_dir: str) -> None:
    from pathlib import PurePosixPath

    p = PurePosixPath(guest_dir) / "pathlike"
    inst.write_file(p, b"ok")
    assert inst.read_file(str(p)) == b"ok"
    with pytest.raises(cc.InvalidArgumentError):
        inst.read_file("/tmp/nul\0byte")


# -- file handles --------------------------------------------------------------


def test_file_handles(inst: cc.Instance, guest_dir: str) -> None:
    p = f"{guest_dir}/handle"
    with inst.create(p) as f:
        assert repr(f) == f"<File {p!r} open>"
        assert f.name == p
        assert f.write(b"0123456789") == 10
        assert f.write("abc") == 3
        assert f.tell() == 13
        assert f.seek(0) == 0
        assert f.read(4) == b"0123"
        assert f.seek(2, cc.SeekWhence.CUR) == 6
        assert f.read() == b"6789abc"
        assert f.read() == b""  # end of file
        assert f.seek(-3, cc.SeekWhence.END) == 10
        assert f.read(100) == b"abc"
        f.truncate(5)
        f.sync()
        info = f.stat()
        assert (info.size, info.name) == (5, "handle")
    assert repr(f) == f"<File {p!r} closed>"
    f.close()
    with pytest.raises(cc.AlreadyClosedError) as e:
        f.read()
    assert e.value.op == "read"
    assert inst.read_file(p) == b"01234"
    with inst.open(p) as r:
        assert r.read(2) == b"01"
        assert r.read(0) == b""
        assert r.read() == b"234"
        with pytest.raises(cc.CCError):
            r.write(b"read-only")
    with pytest.raises(cc.IOError):
        inst.open(f"{guest_dir}/missing")


def test_open_file_flags(inst: cc.Instance, guest_dir: str) -> None:
    p = f"{guest_dir}/flags"
    with inst.open_file(p, cc.O_WRONLY | cc.O_CREATE | cc.O_EXCL, 0o600) as f:
        f.write(b"one\n")
    assert inst.stat(p).permissions == 0o600
    with pytest.raises(cc.IOError):
        inst.open_file(p, cc.O_WRONLY | cc.O_CREATE | cc.O_EXCL)
    with inst.open_file(p, cc.O_WRONLY | cc.O_APPEND) as f:
        f.write(b"two\n")
    assert inst.read_file(p) == b"one\ntwo\n"
    with inst.open_file(p, cc.O_RDWR | cc.O_TRUNC) as f:
        assert f.read() == b""
        f.write(b"new")
    assert inst.read_file(p) == b"new"
    with pytest.raises(cc.InvalidArgumentError):
        inst.open_file(p, -1)
    with pytest.raises(cc.InvalidArgumentError):
        with inst.open(p) as f:
            f.seek(0, 7)


# -- commands ------------------------------------------------------------------


def test_output_and_run(inst: cc.Instance) -> None:
    assert inst.command("echo", "hello").output() == b"hello\n"
    assert inst.command("sh", "-c", "exit 3").run() == 3
    cmd = inst.command("sh", "-c", "echo out; echo err >&2; exit 5")
    assert cmd.exit_code is None
    assert cmd.output() == b"out\n"
    assert cmd.exit_code == 5
    cmd = inst.command("sh", "-c", "echo out; echo err >&2")
    assert cmd.combined_output() == b"out\nerr\n"
    assert cmd.exit_code == 0
    assert repr(cmd) == "<Cmd ['sh', '-c', 'echo out; echo err >&2'] exit_code=0>"
    assert inst.command("sh", "-c", "kill -9 $$").run() == -9


def test_dir_env_user(inst: cc.Instance) -> None:
    cmd = inst.command("sh", "-c", "pwd; echo $MY_VAR")
    assert cmd.set_dir("/tmp") is cmd
    assert cmd.set_env("MY_VAR", "value") is cmd
    assert cmd.get_env("MY_VAR") == "value"
    assert cmd.get_env("CC_IMAGE") == "busybox"  # the image's Env
    assert cmd.get_env("NOT_SET") is None
    env = cmd.environ()
    assert "MY_VAR=value" in env and "CC_IMAGE=busybox" in env
    assert any(e.startswith("PATH=") for e in env)
    assert cmd.output() == b"/tmp\nvalue\n"
    assert inst.command("id", "-u").set_user("nobody").output().strip() != b"0"
    assert inst.command("id", "-u").output() == b"0\n"


def test_start_wait_and_pipes(inst: cc.Instance) -> None:
    cmd = inst.command("cat")
    stdin = cmd.stdin_pipe()
    stdout = cmd.stdout_pipe()
    stderr = cmd.stderr_pipe()
    assert "stdin of ['cat']" in repr(stdin)
    cmd.start()
    assert stdin.write(b"hello") == 5
    stdin.write(" world")
    stdin.close()
    stdin.close()
    data = b""
    while chunk := stdout.read(256):
        data += chunk
    assert data == b"hello world"
    assert stdout.read() == b""
    assert stderr.read(-1) == b""
    assert cmd.wait() == 0
    assert cmd.wait() == 0  # again: same code
    assert cmd.exit_code == 0
    stdout.close()
    with pytest.raises(cc.AlreadyClosedError):
        stdout.read()
    with pytest.raises(cc.AlreadyClosedError):
        stdin.write(b"late")


def test_stderr_pipe(inst: cc.Instance) -> None:
    cmd = inst.command("sh", "-c", "echo oops >&2; exit 1")
    with cmd.stderr_pipe() as err:
        cmd.start()
        assert err.read(-1) == b"oops\n"
    assert cmd.wait() == 1


def test_kill(inst: cc.Instance) -> None:
    cmd = inst.command("sleep", "100")
    cmd.start()
    cmd.kill()
    assert cmd.wait() == -9
    cmd.kill()  # ended: fine


class Screen:
    """What a terminal showed, read by a thread from a command's stdout."""

    def __init__(self, out: cc.Conn) -> None:
        self.data = b""
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, args=(out,), daemon=True)
        self.reader.start()

    def _read(self, out: cc.Conn) -> None:
        while chunk := out.read(4096):
            with self.lock:
                self.data += chunk

    def text(self) -> str:
        with self.lock:
            return self.data.decode(errors="replace")

    def expect(self, what: str) -> None:
        """Waits until WHAT shows (a bound against hangs, not a speed test)."""
        end = time.monotonic() + 30
        while what not in self.text():
            assert time.monotonic() < end, f"{what!r} never showed: {self.text()!r}"
            time.sleep(0.02)


def test_pty_shell_is_a_terminal_resizes_and_takes_ctrl_c(inst: cc.Instance) -> None:
    cmd = inst.command("sh").pty(rows=24, cols=80)
    keys, out = cmd.stdin_pipe(), cmd.stdout_pipe()
    cmd.start()
    screen = Screen(out)
    screen.expect("# ")
    # Arithmetic tells a command's output from the echo of its typing.
    keys.write(b"tty; test -t 0 && echo py_$((40+2)) $(stty size)\n")
    screen.expect("py_42 24 80")
    assert "/dev/pts/" in screen.text()
    assert "echo py_$((40+2))" in screen.text(), "typed input is echoed"
    cmd.resize(30, 100)
    keys.write(b"echo py_$((1)) $(stty size)\n")
    screen.expect("py_1 30 100")
    keys.write(b"sleep 1000\n")
    screen.expect("sleep 1000")
    time.sleep(0.5)
    keys.write(b"\x03")
    keys.write(b"echo after_$((3+4))\n")
    screen.expect("after_7")
    keys.write(b"exit 3\n")
    assert cmd.wait() == 3
    keys.close()


def test_pty_output_and_bad_input(inst: cc.Instance) -> None:
    cmd = inst.command("sh", "-c", "echo $TERM; echo err >&2").pty(rows=5, cols=20, term="vt100")
    assert cmd.output() == b"vt100\r\nerr\r\n" and cmd.exit_code == 0
    for rows, cols in [(0, 80), (24, 0), (4097, 80), (24, 70000), (-1, 80)]:
        with pytest.raises(cc.InvalidArgumentError):
            inst.command("true").pty(rows=rows, cols=cols)
    with pytest.raises(TypeError):
        inst.command("true").pty(rows=24.0, cols=80)  # type: ignore[arg-type]
    plain = inst.command("sleep", "100")
    plain.start()
    with pytest.raises(cc.InvalidArgumentError):
        plain.resize(24, 80)
    plain.kill()
    plain.wait()
    split = inst.command("true").pty()
    split.stderr_pipe()
    with pytest.raises(cc.InvalidArgumentError):
        split.start()  # a terminal has one output stream


def test_pty_kill_leaves_no_process(inst: cc.Instance) -> None:
    cmd = inst.command("sh").pty()
    keys, out = cmd.stdin_pipe(), cmd.stdout_pipe()
    cmd.start()
    screen = Screen(out)
    screen.expect("# ")
    keys.write(b"sleep 1234 & sleep 1235\n")
    end = time.monotonic() + 30
    while len(running_processes(inst, "sleep 123")) < 2:
        assert time.monotonic() < end, "the sleeps never started"
        time.sleep(0.1)
    cmd.kill()
    assert cmd.wait() == -9
    end = time.monotonic() + 20
    while left := running_processes(inst, "sleep 123"):
        assert time.monotonic() < end, f"left behind: {left}"
        time.sleep(0.1)
    keys.close()


def test_command_misuse(inst: cc.Instance) -> None:
    cmd = inst.command("true")
    with pytest.raises(cc.InvalidArgumentError):
        cmd.wait()  # before start
    cmd.start()
    with pytest.raises(cc.InvalidArgumentError):
        cmd.start()  # twice
    with pytest.raises(cc.InvalidArgumentError):
        cmd.stdout_pipe()  # after start
    assert cmd.wait() == 0
    with pytest.raises(cc.InvalidArgumentError):
        cmd.run()
    with pytest.raises(cc.IOError):
        inst.command("no-such-program").run()
    with pytest.raises(cc.InvalidArgumentError):
        inst.command("")
    with pytest.raises(TypeError):
        inst.command("echo", 1)  # type: ignore[arg-type]
    cmd.close()
    cmd.close()
    with pytest.raises(cc.AlreadyClosedError):
        cmd.kill()
    assert cmd.exit_code == 0


def test_command_timeout(inst: cc.Instance) -> None:
    cmd = inst.command("sleep", "30").set_timeout(0.5)
    start = time.monotonic()
    with pytest.raises(cc.TimeoutError) as info:
        cmd.run()
    assert info.value.code == 5
    assert time.monotonic() - start < 10
    with pytest.raises(cc.InvalidArgumentError):
        inst.command("true").set_timeout(0)


def test_entrypoint_and_load_dir(client: cc.OCIClient, test_images: dict[str, Path]) -> None:
    with client.load_dir(test_images["busybox-layers"]) as src:
        config = src.get_config()
        assert config.entrypoint == ["/bin/echo", "entry:"]
        assert config.cmd == ["default-arg"]
        assert (config.user, config.working_dir) == ("alice", "/data")
        with cc.Instance(src, cc.InstanceOptions(memory_mb=256)) as inst:
            assert inst.entrypoint_command().output() == b"entry: default-arg\n"
            assert inst.entrypoint_command("x", "y").output() == b"entry: x y\n"
            assert inst.command("pwd").output() == b"/data\n"
            assert inst.command("id", "-un").output() == b"alice\n"


def test_load_tar(client: cc.OCIClient, test_images: dict[str, Path]) -> None:
    tar = test_images.get("busybox-docker")
    assert tar is not None
    with client.load_tar(tar) as src:
        assert src.get_config().cmd == ["sh"]
        assert repr(src) == f"<ImageSource {str(tar)!r}>"
    assert repr(src) == f"<ImageSource {str(tar)!r} closed>"
    with pytest.raises(cc.AlreadyClosedError):
        src.get_config()


# -- Ctrl-C and threads ----------------------------------------------------------


def test_ctrl_c_during_run_kills_the_command(inst: cc.Instance) -> None:
    start = time.monotonic()
    with Interrupt(1.0) as intr, pytest.raises(KeyboardInterrupt):
        inst.command("sleep", "100").run()
    took = time.monotonic() - intr.sent_at
    assert intr.sent_at and took < 3, f"KeyboardInterrupt came {took:.1f}s after SIGINT"
    assert time.monotonic() - start < 5
    assert running_processes(inst, "sleep 100") == []


def test_ctrl_c_during_output_and_wait(inst: cc.Instance) -> None:
    with Interrupt(0.5) as intr, pytest.raises(KeyboardInterrupt):
        inst.command("sh", "-c", "sleep 101; echo never").output()
    assert time.monotonic() - intr.sent_at < 3
    cmd = inst.command("sleep", "102")
    cmd.start()
    with Interrupt(0.5) as intr, pytest.raises(KeyboardInterrupt):
        cmd.wait()
    assert time.monotonic() - intr.sent_at < 3
    assert cmd.exit_code == -9
    assert running_processes(inst, "sleep 10") == []


def test_ctrl_c_during_instance_wait(inst: cc.Instance) -> None:
    with Interrupt(0.5) as intr, pytest.raises(KeyboardInterrupt):
        inst.wait()
    assert time.monotonic() - intr.sent_at < 3
    assert inst.is_running  # only the wait stopped


def test_ctrl_c_during_conn_read_loses_nothing(inst: cc.Instance) -> None:
    cmd = inst.command("cat")
    stdin, stdout = cmd.stdin_pipe(), cmd.stdout_pipe()
    cmd.start()
    with Interrupt(0.5) as intr, pytest.raises(KeyboardInterrupt):
        stdout.read()
    assert time.monotonic() - intr.sent_at < 3
    stdin.write(b"after the interrupt")
    stdin.close()
    assert stdout.read(-1) == b"after the interrupt"
    assert cmd.wait() == 0


def test_other_threads_run_during_wait(inst: cc.Instance) -> None:
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        cmd = inst.command("sleep", "1")
        cmd.start()
        before = counter[0]
        cmd.wait()
        during_main = counter[0] - before

        # Off the main thread the call is made directly: still no GIL held.
        result: list[int] = []
        cmd2 = inst.command("sleep", "1")
        cmd2.start()
        waiter = threading.Thread(target=lambda: result.append(cmd2.wait()))
        before = counter[0]
        waiter.start()
        waiter.join()
        during_thread = counter[0] - before
    finally:
        stop.set()
        t.join()
    assert result == [0]
    assert during_main > 10_000 and during_thread > 10_000, (during_main, during_thread)


def test_parallel_commands_from_threads(inst: cc.Instance) -> None:
    outputs: dict[int, bytes] = {}

    def run(i: int) -> None:
        outputs[i] = inst.command("sh", "-c", f"sleep 0.3; echo {i}").output()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outputs == {i: f"{i}\n".encode() for i in range(4)}


# -- mounts --------------------------------------------------------------------

needs_9p = pytest.mark.skipif(
    not kernel_has_9p(), reason="the guest kernel lacks 9p (CONFIG_9P_FS): rebuild it with setup"
)


@needs_9p
def test_mounts(source: cc.ImageSource, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    rw = tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "from-host.txt").write_text("host data")
    options = cc.InstanceOptions(
        memory_mb=256, mounts=[cc.Mount(str(ro), "/mnt/ro"), (str(rw), "/mnt/rw", True)]
    )
    with cc.Instance(source, options) as inst:
        assert inst.read_file("/mnt/ro/from-host.txt") == b"host data"
        with pytest.raises(cc.IOError):
            inst.write_file("/mnt/ro/new.txt", b"refused")
        assert inst.command("sh", "-c", "echo x > /mnt/ro/new2.txt").run() != 0
        assert not (ro / "new.txt").exists() and not (ro / "new2.txt").exists()
        inst.write_file("/mnt/rw/from-guest.txt", b"guest data")
        assert (rw / "from-guest.txt").read_bytes() == b"guest data"
        assert inst.command("sh", "-c", "echo cmd > /mnt/rw/cmd.txt").run() == 0
        assert (rw / "cmd.txt").read_text() == "cmd\n"


# -- snapshots -----------------------------------------------------------------


@pytest.fixture
def snapshot(fresh: cc.Instance) -> Iterator[cc.Snapshot]:
    fresh.write_file("/root/kept.txt", b"in the snapshot")
    fresh.mkdir_all("/var/scratch")
    fresh.write_file("/var/scratch/dropped.txt", b"excluded")
    with fresh.snapshot_filesystem(excludes=["/var/scratch/**"]) as snap:
        yield snap


def test_snapshot_boots_new_instances(snapshot: cc.Snapshot) -> None:
    assert snapshot.name.startswith("localhost/cc-snapshots:")
    assert repr(snapshot) == f"<Snapshot {snapshot.name!r}>"
    with cc.Instance(snapshot, cc.InstanceOptions(memory_mb=256)) as clone:
        assert clone.read_file("/root/kept.txt") == b"in the snapshot"
        with pytest.raises(cc.IOError):
            clone.stat("/var/scratch/dropped.txt")
    with snapshot.as_source() as src, cc.Instance(src, cc.InstanceOptions(memory_mb=256)) as c2:
        assert c2.read_file("/root/kept.txt") == b"in the snapshot"


def test_snapshot_export(
    snapshot: cc.Snapshot, client: cc.OCIClient, source: cc.ImageSource, tmp_path: Path
) -> None:
    snapshot.export_dir(tmp_path / "snap")
    assert (tmp_path / "snap" / "index.json").exists()
    assert (tmp_path / "snap" / "oci-layout").exists()
    client.export_dir(snapshot, tmp_path / "snap2")
    assert (tmp_path / "snap2" / "index.json").exists()
    client.export_dir(source, tmp_path / "image")
    assert (tmp_path / "image" / "index.json").exists()
    with client.load_dir(tmp_path / "snap") as loaded:
        assert loaded.get_config().cmd == ["sh"]
        with cc.Instance(loaded, cc.InstanceOptions(memory_mb=256)) as inst:
            assert inst.read_file("/root/kept.txt") == b"in the snapshot"
    snapshot.close()
    snapshot.close()
    with pytest.raises(cc.AlreadyClosedError):
        snapshot.as_source()
    with pytest.raises(cc.AlreadyClosedError):
        snapshot.export_dir(tmp_path / "again")


# -- bounded host memory for guest-sized results ---------------------------------

MIB = 1 << 20


def _status_bytes(key: str) -> int:
    """A ``/proc/self/status`` line (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no {key} in /proc/self/status")


class PeakRss:
    """How far this process's resident memory peaks above where it was on
    entry (the kernel's peak is reset first)."""

    def __enter__(self) -> PeakRss:
        Path("/proc/self/clear_refs").write_text("5")
        self.before = _status_bytes("VmRSS")
        self.growth = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth = _status_bytes("VmHWM") - self.before


def test_read_file_of_3_gib_is_refused_under_the_default_cap(inst: cc.Instance) -> None:
    assert inst.command("truncate", "-s", "3G", "/big3g").run() == 0
    try:
        start = time.monotonic()
        with PeakRss() as peak, pytest.raises(cc.TooLargeError) as info:
            inst.read_file("/big3g")
        assert time.monotonic() - start < 10, "refused before reading"
        assert peak.growth < 64 * MIB, peak.growth
        e = info.value
        assert (e.code, e.op, e.path) == (cc.ErrorCode.TOO_LARGE, "read_file", "/big3g")
        assert "3221225472 bytes" in e.message and str(1 << 30) in e.message, e.message
        # The rest of an open file is held to the same cap.
        with inst.open("/big3g") as f, pytest.raises(cc.TooLargeError):
            f.read()
    finally:
        inst.remove("/big3g")


def test_read_file_over_2_gib_is_built_once(source: cc.ImageSource) -> None:
    size = 2100 * MIB  # over 2**31: ctypes.string_at's C int length
    options = cc.InstanceOptions(memory_mb=256, max_result_bytes=4 << 30)
    with cc.Instance(source, options) as big:
        tail = f"printf tail | dd of=/big bs=1 seek={size - 4} conv=notrunc"
        script = f"truncate -s {size} /big && {tail}"
        assert big.command("sh", "-c", script).run() == 0
        with PeakRss() as peak:
            data = big.read_file("/big")
        assert len(data) == size
        assert data[:4] == bytes(4) and data[-4:] == b"tail"
        del data
        assert peak.growth < size + 256 * MIB, peak.growth


def test_output_of_300_mb_stays_near_1x(inst: cc.Instance) -> None:
    n = 300_000_000
    with PeakRss() as peak:
        out = inst.command("head", "-c", str(n), "/dev/zero").output()
    assert len(out) == n and out[-1] == 0
    del out
    assert peak.growth < n + 64 * MIB, peak.growth


def test_output_over_the_cap_kills_the_command(source: cc.ImageSource) -> None:
    with cc.Instance(source, cc.InstanceOptions(memory_mb=256, max_result_bytes=MIB)) as small:
        cmd = small.command("cat", "/dev/zero")
        with pytest.raises(cc.TooLargeError) as info:
            cmd.output()
        assert "more than 1048576 bytes" in info.value.message
        assert cmd.exit_code is not None
        with pytest.raises(cc.TooLargeError):
            small.command("sh", "-c", "yes >&2").combined_output()
        cmd = small.command("cat", "/dev/zero")
        with cmd.stdout_pipe() as pipe:
            cmd.start()
            with pytest.raises(cc.TooLargeError):
                pipe.read(-1)
        cmd.kill()
        cmd.wait()
        small.write_file("/two-mb", bytes(2_000_000))
        with pytest.raises(cc.TooLargeError) as info:
            small.read_file("/two-mb")
        assert "2000000 bytes, over max_result_bytes (1048576)" in info.value.message
        assert small.command("echo", "still", "fine").output() == b"still fine\n"
    with pytest.raises(cc.InvalidArgumentError):
        cc.InstanceOptions(max_result_bytes=0)


def test_streaming_copies_over_2_gib_in_constant_memory(inst: cc.Instance, tmp_path: Path) -> None:
    size = 2100 * MIB
    marks = [(0, "head"), ((1 << 31) + 7, "middle"), (size - 4, "tail")]
    script = f"truncate -s {size} /big" + "".join(
        f"; printf {text} | dd of=/big bs=1 seek={at} conv=notrunc 2>/dev/null"
        for at, text in marks
    )
    assert inst.command("sh", "-c", script).run() == 0
    try:
        with PeakRss() as peak:
            copied = inst.copy_out("/big", tmp_path / "big")
        assert copied == size
        assert peak.growth < 64 * MIB, peak.growth
    finally:
        inst.remove("/big")
    with open(tmp_path / "big", "rb") as f:
        assert os.fstat(f.fileno()).st_size == size
        for at, text in marks:
            f.seek(at)
            assert f.read(len(text)) == text.encode()
    (tmp_path / "big").unlink()

    n = 300_000_000
    cmd = inst.command("sh", "-c", f"printf 0123456789; head -c {n} /dev/zero")
    with PeakRss() as peak:
        written = cmd.output_to(tmp_path / "out")
    assert (written, cmd.exit_code) == (n + 10, 0)
    assert peak.growth < 64 * MIB, peak.growth
    with open(tmp_path / "out", "rb") as f:
        assert f.read(10) == b"0123456789"
    assert (tmp_path / "out").stat().st_size == written

    data = os.urandom(3 * MIB)
    (tmp_path / "in").write_bytes(data)
    assert inst.copy_in(tmp_path / "in", "/in", 0o640) == len(data)
    assert inst.stat("/in").mode & 0o7777 == 0o640
    with inst.read_file_stream("/in") as stream:
        back = b"".join(iter(lambda: stream.read(1 << 20), b""))
    assert back == data
    inst.remove("/in")
