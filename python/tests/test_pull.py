"""Pulls: progress, callback errors, options, Ctrl-C and cancellation.

The tests against the slow in-process registry need no VM and no system
tools; those against the real registry (docker-registry + skopeo + the
busybox test image) run with the VM tests."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import socket
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import crumblecracker as cc

from .conftest import Registry
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
        # Once the layer streams: raised earlier, during the config, the
        # cancel comes before the layer is ever asked for (on a loaded
        # machine it did), and there is no download to see aborted.
        if p.current > 0 and slow.layer_started.is_set():
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


def _bomb_layout(layout: Path) -> str:
    """An OCI layout (tag ``latest``) whose one layer is about 1 MiB of gzip
    holding a tar of a 1 GiB file of zeros (gzip members: header, 64 x 16 MiB
    of zeros, end of archive). Returns the layer's digest."""
    header = tarfile.TarInfo("bomb")
    header.size = 1 << 30
    header.mode = 0o644
    zeros = gzip.compress(bytes(16 << 20), compresslevel=9)
    layer = gzip.compress(header.tobuf(format=tarfile.GNU_FORMAT)) + zeros * 64
    layer += gzip.compress(bytes(1024))
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    empty = f"sha256:{hashlib.sha256(b'').hexdigest()}"
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [empty]},
        }
    ).encode()
    layer_digest = put(layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest),
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return layer_digest


@pytest.mark.vm
def test_decompression_bombs_and_unpack_limits(
    registry: Registry, busybox_ref: str, fresh_client: cc.OCIClient, tmp_path: Path
) -> None:
    layer = _bomb_layout(tmp_path / "bomb")
    ref = registry.push(tmp_path / "bomb", "latest", "py/bomb:1")
    with pytest.raises(cc.IOError, match=f"layer {layer} .* expands past"):
        fresh_client.pull(ref)
    # The limits travel through the C options: a small total refuses busybox.
    with pytest.raises(cc.IOError, match="whole-image limit"):
        fresh_client.pull(busybox_ref, cc.PullOptions(max_image_bytes=1 << 20))
    with fresh_client.pull(busybox_ref, cc.PullOptions(max_layer_ratio=5)) as src:
        assert src.name == busybox_ref


@pytest.mark.vm
def test_short_name_from_a_registries_conf_mirror(
    registry: Registry,
    busybox_ref: str,
    fresh_client: cc.OCIClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session registry is the mirror; nothing listens at the registry's
    # own location, so only the mirror can serve the short name.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    conf = tmp_path / "registries.conf"
    conf.write_text(
        'unqualified-search-registries = ["registry.invalid"]\n'
        f'[[registry]]\nprefix = "registry.invalid"\nlocation = "{dead}"\n'
        f'[[registry.mirror]]\nlocation = "{registry.addr}"\n'
    )
    monkeypatch.setenv("CC_REGISTRIES_CONF", str(conf))
    with fresh_client.pull("test/busybox") as src:
        assert src.get_config().labels == {"org.example.test": "busybox"}
    # Stored under the name the short one resolved to: found without a pull.
    with fresh_client.pull("test/busybox", cc.PullOptions(policy=cc.PullPolicy.NEVER)) as src:
        assert src.get_config().labels == {"org.example.test": "busybox"}

    conf.write_text('[[registry]]\nlocation = "a.test"\ninsecure = "yes"\n')
    with pytest.raises(cc.CCError) as e:
        fresh_client.pull("test/busybox", cc.PullOptions(policy=cc.PullPolicy.ALWAYS))
    assert f"{conf} line 3" in str(e.value)
