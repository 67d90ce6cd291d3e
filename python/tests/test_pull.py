"""Pulls: progress, callback errors, options, Ctrl-C and cancellation.

The tests against the slow in-process registry need no VM and no system
tools; those against the real registry (docker-registry + skopeo + the
busybox test image) run with the VM tests."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import crumblecracker as cc

from .slow_registry import SlowRegistry


class Boom(Exception):
    pass


@pytest.fixture
def slow() -> Iterator[SlowRegistry]:
    reg = SlowRegistry()
    yield reg
    reg.close()


@pytest.fixture
def fresh_client(lib: None, tmp_path: Path) -> Iterator[cc.OCIClient]:
    with cc.OCIClient(tmp_path / "store") as c:
        yield c


# -- against the slow registry (no VM) ---------------------------------------------


def test_ctrl_c_cancels_a_pull(slow: SlowRegistry, fresh_client: cc.OCIClient) -> None:
    events: list[cc.PullProgress] = []
    sent = [0.0]

    def interrupt() -> None:
        slow.layer_started.wait(30)
        time.sleep(0.5)
        sent[0] = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Thread(target=interrupt)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            fresh_client.pull(slow.ref, progress_callback=events.append)
    finally:
        timer.join()
    assert sent[0], "the layer download never started"
    assert time.monotonic() - sent[0] < 3
    assert events and events[-1].current < events[-1].total
    # The pull was cancelled: the download stopped.
    assert slow.layer_aborted.wait(5)


def test_callback_exception_is_reraised(slow: SlowRegistry, fresh_client: cc.OCIClient) -> None:
    calls = []

    def on_progress(p: cc.PullProgress) -> None:
        calls.append(p)
        if p.current > 0:
            raise Boom("from the callback")

    start = time.monotonic()
    with pytest.raises(Boom, match="from the callback") as info:
        fresh_client.pull(slow.ref, progress_callback=on_progress)
    assert time.monotonic() - start < 10  # cancelled, not downloaded to the end
    assert info.value.__context__ is None
    assert calls[-1].current > 0
    assert slow.layer_aborted.wait(5)


def test_keyboard_interrupt_raised_by_the_callback(
    slow: SlowRegistry, fresh_client: cc.OCIClient
) -> None:
    def on_progress(p: cc.PullProgress) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fresh_client.pull(slow.ref, progress_callback=on_progress)


def test_closing_the_client_cancels_its_pull(lib: None, slow: SlowRegistry, tmp_path: Path) -> None:
    client = cc.OCIClient(tmp_path)

    def close_later() -> None:
        slow.layer_started.wait(30)
        client.close()

    t = threading.Thread(target=close_later)
    t.start()
    try:
        with pytest.raises(cc.CancelledError) as info:
            client.pull(slow.ref)
        assert info.value.code == 9
    finally:
        t.join()


def test_other_threads_run_during_a_pull(slow: SlowRegistry, fresh_client: cc.OCIClient) -> None:
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    def stop_pull(p: cc.PullProgress) -> None:
        if p.current >= 256 << 10:
            raise Boom

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        with pytest.raises(Boom):
            fresh_client.pull(slow.ref, progress_callback=stop_pull)
    finally:
        stop.set()
        spinner.join()
    assert counter[0] > 10_000


def test_pull_from_a_thread(slow: SlowRegistry, fresh_client: cc.OCIClient) -> None:
    # Off the main thread pull() calls the library directly; the callback
    # then runs on the calling thread.
    threads: list[str] = []
    errors: list[BaseException] = []

    def on_progress(p: cc.PullProgress) -> None:
        threads.append(threading.current_thread().name)
        raise Boom

    def run() -> None:
        try:
            fresh_client.pull(slow.ref, progress_callback=on_progress)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name="puller")
    t.start()
    t.join(30)
    assert [type(e) for e in errors] == [Boom]
    assert threads == ["puller"]


def test_unknown_image_is_a_network_error(slow: SlowRegistry, fresh_client: cc.OCIClient) -> None:
    with pytest.raises(cc.NetworkError):
        fresh_client.pull(f"{slow.addr}/no/such:latest")


def test_pull_never_without_the_image(fresh_client: cc.OCIClient) -> None:
    with pytest.raises(cc.CCError):
        fresh_client.pull("127.0.0.1:1/absent:latest", cc.PullOptions(policy=cc.PullPolicy.NEVER))


def test_bad_platform(fresh_client: cc.OCIClient) -> None:
    with pytest.raises(cc.InvalidArgumentError):
        fresh_client.pull("127.0.0.1:1/x:latest", cc.PullOptions(platform="not a platform"))
    with pytest.raises(TypeError):
        fresh_client.pull("x", options={"platform": "linux/amd64"})  # type: ignore[arg-type]


# -- against the real registry (with the VM tests) -----------------------------------


@pytest.mark.vm
def test_progress_events(busybox_ref: str, fresh_client: cc.OCIClient) -> None:
    events: list[cc.PullProgress] = []
    with fresh_client.pull(busybox_ref, progress_callback=events.append) as src:
        assert src.name == busybox_ref
        assert repr(src) == f"<ImageSource {busybox_ref!r}>"
    assert events
    totals = {e.total for e in events if e.total}
    assert len(totals) == 1
    assert all(a.current <= b.current for a, b in zip(events, events[1:]))
    last = events[-1]
    assert last.current == last.total > 0
    assert all(0 <= e.blob_index < e.blob_count for e in events)
    assert all(e.blob.startswith("sha256:") for e in events)
    assert all(e.eta_seconds is None or e.eta_seconds >= 0 for e in events)


@pytest.mark.vm
def test_pull_options_and_config(busybox_ref: str, fresh_client: cc.OCIClient) -> None:
    opts = cc.PullOptions(platform="linux/amd64", policy=cc.PullPolicy.ALWAYS)
    with fresh_client.pull(busybox_ref, opts) as src:
        config = src.get_config()
    assert (config.architecture, config.os) == ("amd64", "linux")
    assert config.cmd == ["sh"] and config.entrypoint == []
    assert "CC_IMAGE=busybox" in config.env
    assert config.labels == {"org.example.test": "busybox"}
    # Now stored: NEVER finds it without the registry.
    with fresh_client.pull(busybox_ref, cc.PullOptions(policy=cc.PullPolicy.NEVER)) as src:
        assert src.get_config() == config


@pytest.mark.vm
def test_callback_exception_with_the_real_registry(
    busybox_ref: str, fresh_client: cc.OCIClient
) -> None:
    def on_progress(p: cc.PullProgress) -> None:
        raise Boom(p.blob)

    with pytest.raises(Boom):
        fresh_client.pull(busybox_ref, progress_callback=on_progress)
    # The client is still usable.
    with fresh_client.pull(busybox_ref) as src:
        assert src.get_config().cmd == ["sh"]
