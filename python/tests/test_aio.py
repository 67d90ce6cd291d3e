"""``crumblecracker.aio``: the asyncio API generated from the synchronous
one. The tests marked ``vm`` boot real VMs (CC_RUN_VM_TESTS=1); the others
need none."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

import crumblecracker as cc
from crumblecracker import _call, aio

from .conftest import image_json
from .test_unit import run_python

T = TypeVar("T")

vm = pytest.mark.vm

PAIRS = [
    (aio.OCIClient, cc.OCIClient),
    (aio.ImageSource, cc.ImageSource),
    (aio.Instance, cc.Instance),
    (aio.Cmd, cc.Cmd),
    (aio.Conn, cc.Conn),
    (aio.File, cc.File),
    (aio.Listener, cc.Listener),
    (aio.ExposedPort, cc.ExposedPort),
    (aio.Snapshot, cc.Snapshot),
]

INLINE = {
    "command",
    "entrypoint_command",
    "set_dir",
    "set_env",
    "set_user",
    "set_timeout",
    "pty",
    "get_env",
    "environ",
    "stdin_pipe",
    "stdout_pipe",
    "stderr_pipe",
}


def run(coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# -- no VM ---------------------------------------------------------------------


def test_aio_mirrors_the_sync_api() -> None:
    for name in cc.__all__:
        if name != "__version__":
            assert hasattr(aio, name), name
    assert sorted(aio.__all__) == sorted(set(aio.__all__))
    for name in aio.__all__:
        assert hasattr(aio, name), name
    # Value types and exceptions are the same objects.
    assert aio.InstanceOptions is cc.InstanceOptions and aio.IOError is cc.IOError
    for wrapper, sync in PAIRS:
        for name, member in inspect.getmembers(sync):
            if name.startswith("_"):
                continue
            assert hasattr(wrapper, name), f"aio.{wrapper.__name__}.{name}"
            generated = inspect.getattr_static(wrapper, name)
            if isinstance(inspect.getattr_static(sync, name), classmethod):
                # A constructor: a class-level coroutine giving the wrapper.
                assert isinstance(generated, classmethod), name
                assert inspect.iscoroutinefunction(generated.__func__), name
            elif isinstance(member, property):
                assert isinstance(generated, property), name
            elif name in INLINE:
                assert not inspect.iscoroutinefunction(generated), name
            else:
                assert inspect.iscoroutinefunction(generated), f"aio.{wrapper.__name__}.{name}"
        assert aio.wrap.__module__ == "crumblecracker.aio"
    assert inspect.iscoroutinefunction(aio.Listener.accept)
    assert inspect.iscoroutinefunction(aio.Conn.close_write)
    assert inspect.iscoroutinefunction(aio.Instance.listen)
    assert inspect.iscoroutinefunction(aio.shutdown)
    assert "Waits for the next guest connection" in (aio.Listener.accept.__doc__ or "")


def test_aio_imports_without_the_library() -> None:
    r = run_python(
        """
        from crumblecracker import aio
        try:
            aio.OCIClient()
        except aio.LibraryLoadError as e:
            print("ERROR", type(e).__name__)
        """,
        LIBCC_PATH="/nonexistent/libcc.so",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ERROR LibraryLoadError\n"


def test_aio_type_declarations_are_current() -> None:
    # The typed declarations of the generated members (for mypy) are
    # generated from the synchronous classes too.
    path = Path(aio.__file__)
    text = path.read_text()
    assert aio._regenerate(text) == text, "out of date: run `python -m crumblecracker.aio`"
    decl = aio._declarations(aio.Listener)
    assert "async def accept(self, cancel: Optional[CancelToken] = None) -> Conn: ..." in decl
    assert "def command(self, program: str, *args: str) -> Cmd: ..." in aio._declarations(
        aio.Instance
    )


def test_aio_client_and_wrapping(lib: None, tmp_path: Path) -> None:
    async def main() -> None:
        async with aio.OCIClient(tmp_path) as client:
            assert repr(client) == f"<aio.OCIClient {str(tmp_path)!r}>"
            assert isinstance(client.wrapped, cc.OCIClient)
            assert await client is client  # awaiting a started object: itself
            with pytest.raises(cc.IOError):
                await client.load_tar(tmp_path / "missing.tar")
            assert not client.closed
        assert client.closed and repr(client).endswith(" closed>")
        await client.close()  # idempotent
        with pytest.raises(cc.AlreadyClosedError):
            await client.pull("x")

    run(main())
    sync = cc.OCIClient(tmp_path)
    wrapped = aio.wrap(sync)
    assert isinstance(wrapped, aio.OCIClient) and wrapped.wrapped is sync
    assert aio.wrap(42) == 42
    assert isinstance(aio.OCIClient(tmp_path), aio.OCIClient)
    with pytest.raises(TypeError):
        aio.Conn(sync)
    sync.close()


def test_aio_instance_not_started(lib: None) -> None:
    bogus = cc.ImageSource(0xDEAD_BEEF, "bogus")
    inst = aio.Instance(bogus, cc.InstanceOptions(memory_mb=256))
    assert repr(inst) == "<aio.Instance not started>"
    assert not inst.closed
    with pytest.raises(cc.InvalidArgumentError, match="not started"):
        inst.command("true")
    with pytest.raises(cc.InvalidArgumentError, match="not started"):
        _ = inst.id
    run(inst.close())  # nothing to close
    with pytest.raises(TypeError):
        aio.Instance("alpine")  # type: ignore[arg-type]

    async def boot() -> None:
        async with inst:
            pass

    with pytest.raises(cc.InvalidHandleError):
        run(boot())  # boots in a worker thread, which reports the error
    bogus.close()


def test_aio_cancel_interrupts_the_blocking_call() -> None:
    stop = threading.Event()
    interrupted: list[str] = []

    def blocking() -> bool:
        def on_interrupt(call: _call.Call[bool]) -> None:
            interrupted.append(threading.current_thread().name)
            stop.set()
            call.wait(5)

        return _call.interruptible(lambda: stop.wait(30), on_interrupt, "test")

    async def main() -> float:
        task = asyncio.ensure_future(aio.run_in_thread(blocking))
        await asyncio.sleep(0.3)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start

    took = run(main())
    assert took < 2
    assert interrupted == ["crumblecracker-aio"]
    assert stop.is_set()


def test_aio_cancel_salvages_a_late_result() -> None:
    release = threading.Event()
    salvaged: list[str] = []

    def uninterruptible() -> str:
        release.wait(10)
        return "late"

    async def main() -> None:
        task = asyncio.ensure_future(aio.run_in_thread(uninterruptible, salvaged.append))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0.2)
        assert not task.done()  # the call runs to its end first
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert salvaged == ["late"]


def test_aio_errors_come_through() -> None:
    def fail() -> None:
        raise cc.NetworkError("no route", op="dial")

    async def main() -> None:
        with pytest.raises(cc.NetworkError) as info:
            await aio.run_in_thread(fail)
        assert info.value.op == "dial"

    run(main())


# -- VMs -----------------------------------------------------------------------


@vm
def test_aio_instance_command_and_listener(store_dir: Path, busybox_ref: str, lib: None) -> None:
    async def main() -> None:
        async with aio.OCIClient(store_dir) as client:
            source = await client.pull(busybox_ref)
            assert isinstance(source, aio.ImageSource)
            config = await source.get_config()
            assert config.cmd == ["sh"]
            async with aio.Instance(source, cc.InstanceOptions(memory_mb=256)) as inst:
                assert isinstance(inst, aio.Instance) and inst.is_running
                assert repr(inst) == f"<aio.Instance {inst.id!r} open>"
                assert await inst.command("echo", "hello").output() == b"hello\n"
                cmd = inst.command("sh", "-c", "echo $X; exit 3")
                assert cmd.set_env("X", "y") is cmd
                assert await cmd.output() == b"y\n" and cmd.exit_code == 3

                # The loop keeps running while calls block in worker threads.
                ticks = 0

                async def tick() -> None:
                    nonlocal ticks
                    while True:
                        ticks += 1
                        await asyncio.sleep(0.01)

                ticker = asyncio.ensure_future(tick())
                async with await inst.listen("tcp", ":0") as listener:
                    assert isinstance(listener, aio.Listener)
                    assert listener.addr == f"host.internal:{listener.port}"

                    async def serve() -> bytes:
                        conn = await listener.accept()
                        assert isinstance(conn, aio.Conn)
                        assert conn.local_addr == f"127.0.0.254:{listener.port}"
                        async with conn:
                            await conn.write(b"ignored")
                            return bytes(await conn.read(-1))

                    guest = inst.command(
                        "sh",
                        "-c",
                        f"sleep 0.5; echo from asyncio | nc host.internal {listener.port}",
                    )
                    data, code = await asyncio.gather(serve(), guest.run())
                    assert (data, code) == (b"from asyncio\n", 0)
                ticker.cancel()
                assert ticks > 10, ticks
                assert listener.closed
            assert inst.closed and not inst.is_running
            await source.close()

    run(main())


@vm
def test_aio_calls_take_cancel_tokens(inst: cc.Instance) -> None:
    async def main() -> None:
        ainst = aio.wrap(inst)
        listener = await ainst.listen("tcp", ":0")
        for op, call in [
            ("wait", lambda t: ainst.wait(cancel=t)),
            ("accept", lambda t: listener.accept(cancel=t)),
        ]:
            with aio.CancelToken() as token:
                asyncio.get_running_loop().call_later(0.3, token.cancel)
                with pytest.raises(aio.CancelledError, match=f"^{op} cancelled$"):
                    await asyncio.wait_for(call(token), 10)
        await listener.close()

    run(main())


@vm
def test_aio_pty(inst: cc.Instance) -> None:
    async def main() -> None:
        ainst = aio.wrap(inst)
        cmd = ainst.command("sh", "-c", "read line; stty size")
        assert cmd.pty(rows=24, cols=80) is cmd
        keys, out = cmd.stdin_pipe(), cmd.stdout_pipe()
        await cmd.start()
        await cmd.resize(30, 100)
        await keys.write(b"\n")
        assert b"30 100" in bytes(await out.read(-1))
        assert await cmd.wait() == 0

    run(main())


@vm
def test_aio_cancellation(inst: cc.Instance) -> None:
    async def main() -> None:
        ainst = aio.wrap(inst)
        assert isinstance(ainst, aio.Instance) and ainst.wrapped is inst
        listener = await ainst.listen("tcp", ":0")

        # An accept timing out stops; the listener stays usable.
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(listener.accept(), 0.5)
        assert time.monotonic() - start < 5

        # A command whose task is cancelled is killed.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ainst.command("sleep", "103").run(), 0.5)
        ps = await ainst.command("ps", "-o", "args").output()
        assert b"sleep 103" not in ps

        # A read whose task is cancelled loses nothing; writes go on meanwhile.
        guest = ainst.command("nc", "host.internal", str(listener.port))
        stdin, stdout = guest.stdin_pipe(), guest.stdout_pipe()
        await guest.start()
        conn = await listener.accept()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(conn.read(), 0.5)
        assert await asyncio.wait_for(conn.write(b"ping"), 10) == 4
        got = b""
        while len(got) < 4:
            got += await stdout.read()
        assert got == b"ping"
        await stdin.write(b"pong")
        got = b""
        while len(got) < 4:
            got += await asyncio.wait_for(conn.read(), 10)
        assert got == b"pong"

        # Closing from another task ends an accept.
        pending = asyncio.ensure_future(listener.accept())
        await asyncio.sleep(0.3)
        await listener.close()
        with pytest.raises(cc.AlreadyClosedError):
            await asyncio.wait_for(pending, 10)

        await conn.close()
        await stdin.close()
        assert await guest.wait() == 0

    run(main())


@vm
@vm
def test_aio_park_and_restore(source: cc.ImageSource, tmp_path: Path) -> None:
    async def main() -> None:
        async with aio.Instance(source, cc.InstanceOptions(memory_mb=256)) as ainst:
            await ainst.write_file("/tmp/kept", b"yes")
            assert await ainst.park(tmp_path / "p") > 0
        restored = await aio.Instance.restore(tmp_path / "p")
        async with restored:
            assert isinstance(restored, aio.Instance)
            assert restored.start_kind == cc.StartKind.RESTORED
            assert await restored.read_file("/tmp/kept") == b"yes"
            kids = await restored.branch(1)
            assert [type(k) for k in kids] == [aio.Instance]
            async with kids[0]:
                assert await kids[0].read_file("/tmp/kept") == b"yes"

    run(main())


def test_aio_files_expose_and_snapshot(inst: cc.Instance, tmp_path: Path) -> None:
    async def main() -> None:
        ainst = aio.wrap(inst)
        async with await ainst.create("/tmp/aio-file") as f:
            assert isinstance(f, aio.File)
            assert await f.write(b"0123456789") == 10
            assert await f.seek(2) == 2
            assert await f.read(3) == b"234"
        assert await ainst.read_file("/tmp/aio-file") == b"0123456789"
        entries = await ainst.read_dir("/tmp")
        assert "aio-file" in [e.name for e in entries]

        cmd = ainst.command("sh", "-c", "echo hi | nc -l -p 7010")
        await cmd.start()
        while True:
            try:
                conn = await ainst.dial("tcp", ":7010")
                break
            except cc.NetworkError:
                await asyncio.sleep(0.05)
        async with conn:
            assert await conn.read(-1) == b"hi\n"
        assert await cmd.wait() == 0

        async with await ainst.expose(7011) as exposed:
            assert isinstance(exposed, aio.ExposedPort)
            assert exposed.guest_port == 7011 and exposed.host_port > 0
            with pytest.raises(cc.InvalidArgumentError):
                await ainst.expose(7011)
        with pytest.raises(cc.InvalidArgumentError):
            await ainst.expose(70000)

        async with await ainst.snapshot_filesystem(excludes=["/proc/**"]) as snap:
            assert isinstance(snap, aio.Snapshot)
            await snap.export_dir(tmp_path / "snap")
        assert image_json(tmp_path / "snap") is not None
        await ainst.remove("/tmp/aio-file")

    run(main())
