"""Tests that need no VM: loading, versions, capabilities, types, options,
errors, and closed or bad objects."""

from __future__ import annotations

import builtins
import ctypes
import errno
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import crumblecracker as cc
from crumblecracker import _lib

from .conftest import PYTHON_DIR, RUN_VM_TESTS, WORKSPACE

HEADER = WORKSPACE / "include" / "cc.h"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs CODE in a fresh interpreter with ENV added (empty values unset)."""
    full = dict(os.environ)
    for k, v in env.items():
        if v:
            full[k] = v
        else:
            full.pop(k, None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- loading -------------------------------------------------------------------


def test_import_works_without_the_library() -> None:
    r = run_python(
        """
        import crumblecracker as cc
        print(cc.__version__, cc.IOError.__name__, cc.O_CREATE)
        try:
            cc.api_version()
        except cc.LibraryLoadError as e:
            assert isinstance(e, RuntimeError)
            print("ERROR:", e)
        """,
        LIBCC_PATH="/nonexistent/libcc.so",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("0.1.0 IOError 512\n")
    err = r.stdout.split("ERROR: ", 1)[1]
    assert "LIBCC_PATH=/nonexistent/libcc.so" in err
    assert "does not exist" in err
    assert "cargo build --release -p cc-capi" in err
    assert "pip install ./python" in err


def test_libcc_path_not_a_library(tmp_path: Path) -> None:
    bogus = tmp_path / "libcc.so"
    bogus.write_text("not an ELF file\n")
    r = run_python(
        """
        import crumblecracker as cc
        try:
            cc.init()
        except cc.LibraryLoadError as e:
            print("ERROR:", e)
        """,
        LIBCC_PATH=str(bogus),
    )
    assert r.returncode == 0, r.stderr
    assert f"LIBCC_PATH={bogus}: cannot load" in r.stdout
    assert "LIBCC_PATH=/path/to/libcc.so" in r.stdout


def test_libcc_path_another_library() -> None:
    libc = "/lib/x86_64-linux-gnu/libc.so.6"
    if not Path(libc).exists():
        pytest.skip(f"{libc} not found")
    r = run_python(
        """
        import crumblecracker as cc
        try:
            cc.api_version()
        except cc.LibraryLoadError as e:
            print("ERROR:", e)
        """,
        LIBCC_PATH=libc,
    )
    assert r.returncode == 0, r.stderr
    assert "is not a compatible libcc.so: it lacks cc_init" in r.stdout


def test_libcc_path_directory() -> None:
    path = Path(_lib.library_path())
    r = run_python(
        "import crumblecracker as cc; print(cc.library_path(), cc.api_version())",
        LIBCC_PATH=str(path.parent),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(path.parent / "libcc.so"), cc.api_version()]


def test_development_fallback_without_libcc_path() -> None:
    # An editable install finds the workspace's build (or a bundled copy).
    r = run_python(
        "import crumblecracker as cc; print(cc.library_path())",
        LIBCC_PATH="",
    )
    if r.returncode != 0 and "libcc.so not found" in r.stderr:
        pytest.skip("no bundled copy and no development build in the workspace")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("libcc.so")


# -- versions and capabilities ---------------------------------------------------


def header_defines() -> dict[str, int]:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not found")
    text = HEADER.read_text()
    defines = {m[0]: int(m[1], 0) for m in re.findall(r"#define (CC_\w+) (\d+)", text)}
    enum = {m[0]: int(m[1]) for m in re.findall(r"\b(CC_(?:OK|ERR_\w+)) = (\d+)", text)}
    return {**defines, **enum}


def test_api_version() -> None:
    d = header_defines()
    want = f"{d['CC_API_VERSION_MAJOR']}.{d['CC_API_VERSION_MINOR']}.{d['CC_API_VERSION_PATCH']}"
    assert cc.api_version() == want
    major, minor = d["CC_API_VERSION_MAJOR"], d["CC_API_VERSION_MINOR"]
    assert cc.api_version_compatible(major, minor)
    assert cc.api_version_compatible(major, 0)
    assert not cc.api_version_compatible(major, minor + 1)
    assert not cc.api_version_compatible(major + 1, 0)
    assert not cc.api_version_compatible(-1, 0)
    with pytest.raises(TypeError):
        cc.api_version_compatible("0", 1)  # type: ignore[arg-type]


def test_guest_protocol_version() -> None:
    v = cc.guest_protocol_version()
    assert isinstance(v, int) and v >= 1


def test_supports_hypervisor_and_capabilities(lib: None) -> None:
    # True wherever instances can run, under KVM or TCG: always where the
    # VM tests run. Elsewhere the query says what is missing.
    supported = cc.supports_hypervisor()
    assert supported or not RUN_VM_TESTS
    if not supported:
        with pytest.raises(cc.HypervisorUnavailableError):
            cc.query_capabilities()
        return
    caps = cc.query_capabilities()
    assert isinstance(caps, cc.Capabilities)
    assert caps.architecture == "x86_64"
    assert caps.accelerator in ("kvm", "tcg")
    assert caps.hypervisor_available is True
    assert caps.hardware_accelerated is (caps.accelerator == "kvm")
    assert repr(caps).startswith("Capabilities(architecture='x86_64'")
    # The confinement in force, as the C library reports it.
    assert isinstance(caps.confined_seccomp, bool)
    assert isinstance(caps.confined_namespaces, bool)
    assert isinstance(caps.sandbox_uid, int)
    assert all(isinstance(g, str) and g for g in caps.confinement_gaps)
    # The kernel's build hash: hex digits, or None when unknown.
    assert caps.kernel_hash is None or int(caps.kernel_hash, 16) >= 0


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"CC_QEMU": "/nonexistent/qemu-system-x86_64"}, "qemu"),
        ({"CC_KERNEL": "/nonexistent/vmlinux"}, "/nonexistent/vmlinux"),
        ({"CC_ACCEL": "hvf"}, "hvf"),
        ({"CC_ACCEL": "kvm"}, "kvm"),
    ],
)
def test_no_hypervisor_where_no_instance_can_start(
    lib: None, env: dict[str, str], reason: str
) -> None:
    if env == {"CC_ACCEL": "kvm"} and (
        not cc.supports_hypervisor() or cc.query_capabilities().hardware_accelerated
    ):
        pytest.skip("needs a host that runs instances without KVM")
    r = run_python(
        """
        import crumblecracker as cc
        cc.init()
        print("SUPPORTS", cc.supports_hypervisor())
        try:
            cc.query_capabilities()
        except cc.HypervisorUnavailableError as e:
            print("ERROR", e.code, e)
        """,
        **env,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "SUPPORTS False", r.stdout
    assert lines[1].startswith("ERROR 6 ") and reason in lines[1], r.stdout


def test_forced_software_emulation_runs_instances(lib: None) -> None:
    if not cc.supports_hypervisor():
        pytest.skip("no instance can run here at all")
    # Software emulation (TCG) runs instances anywhere QEMU does.
    r = run_python(
        """
        import crumblecracker as cc
        cc.init()
        caps = cc.query_capabilities()
        print(cc.supports_hypervisor(), caps.accelerator, caps.hardware_accelerated)
        """,
        CC_ACCEL="tcg",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "tcg", "False"]


def test_not_initialized() -> None:
    r = run_python(
        """
        import crumblecracker as cc
        print(cc.api_version())  # works without init
        try:
            cc.OCIClient()
        except cc.InvalidArgumentError as e:
            print("ERROR", e)
        cc.init()
        cc.init()  # again: fine
        cc.OCIClient().close()
        cc.shutdown()
        cc.shutdown()  # again: fine
        try:
            cc.OCIClient()
        except cc.InvalidArgumentError as e:
            print("ERROR", e)
        """
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1:] == ["ERROR library not initialized: call crumblecracker.init() first"] * 2


# -- the C API as declared here ------------------------------------------------


def test_prototypes_cover_the_header() -> None:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not found")
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    declared = set(re.findall(r"\b(cc_\w+)\(", text))
    assert declared == set(_lib.PROTOTYPES), (
        f"missing here: {sorted(declared - set(_lib.PROTOTYPES))}; "
        f"not in the header: {sorted(set(_lib.PROTOTYPES) - declared)}"
    )


def test_argument_counts_match_the_header() -> None:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not found")
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    for name, params in re.findall(r"\b(cc_\w+)\(([^)]*)\);", text):
        params = params.strip()
        count = 0 if params in ("", "void") else params.count(",") + 1
        assert len(_lib.PROTOTYPES[name][1]) == count, name


def test_constants_match_the_header() -> None:
    d = header_defines()
    for name in ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_APPEND", "O_CREATE", "O_TRUNC", "O_EXCL"):
        assert getattr(cc, name) == d[f"CC_{name}"], name
    for p in cc.PullPolicy:
        assert p.value == d[f"CC_PULL_{p.name}"]
    for w in cc.SeekWhence:
        assert w.value == d[f"CC_SEEK_{w.name}"]
    for code in cc.ErrorCode:
        key = "CC_OK" if code.name == "OK" else f"CC_ERR_{code.name}"
        assert code.value == d[key], code
    assert _lib.CC_DEFAULT_MAX_RESULT_BYTES == d["CC_DEFAULT_MAX_RESULT_BYTES"]


def test_struct_layouts_match_the_header(tmp_path: Path) -> None:
    # The ctypes structs, field by field, against what a C compiler makes
    # of cc.h: a field added to one side only shows here.
    compiler = shutil.which("cc")
    if compiler is None or not HEADER.exists():
        pytest.skip("needs a C compiler and cc.h")
    structs = {
        "cc_error": _lib.CError,
        "cc_capabilities": _lib.CCapabilities,
        "cc_instance_options": _lib.CInstanceOptions,
        "cc_pull_options": _lib.CPullOptions,
        "cc_pull_progress": _lib.CPullProgress,
        "cc_mount": _lib.CMount,
        "cc_file_info": _lib.CFileInfo,
        "cc_dir_entry": _lib.CDirEntry,
        "cc_image_config": _lib.CImageConfig,
    }
    lines = []
    expected = []
    for c_name, py in structs.items():
        lines.append(f'printf("%zu\\n", sizeof({c_name}));')
        expected.append(ctypes.sizeof(py))
        for field, *_ in py._fields_:
            lines.append(f'printf("%zu\\n", offsetof({c_name}, {field}));')
            expected.append(getattr(py, field).offset)
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stdio.h>\n#include <cc.h>\nint main(void) {\n"
        + "\n".join(lines)
        + "\nreturn 0;\n}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(
        [compiler, "-I", str(HEADER.parent), str(source), "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    assert [int(n) for n in out.split()] == expected


def test_loaded_library_declares_everything() -> None:
    lib = _lib.native()
    for name, (restype, argtypes) in _lib.PROTOTYPES.items():
        fn = getattr(lib, name)
        assert fn.restype is restype and fn.argtypes == argtypes, name


# -- exceptions ----------------------------------------------------------------

ERRORS = [
    (cc.InvalidHandleError, 1),
    (cc.InvalidArgumentError, 2),
    (cc.NotRunningError, 3),
    (cc.AlreadyClosedError, 4),
    (cc.TimeoutError, 5),
    (cc.HypervisorUnavailableError, 6),
    (cc.IOError, 7),
    (cc.NetworkError, 8),
    (cc.CancelledError, 9),
    (cc.TooLargeError, 10),
    (cc.PausedError, 11),
]


@pytest.mark.parametrize(("cls", "code"), ERRORS)
def test_exception_tree(cls: type[cc.CCError], code: int) -> None:
    assert issubclass(cls, cc.CCError) and issubclass(cc.CCError, Exception)
    e = cls("it failed", op="stat", path="/x")
    assert (e.code, e.message, e.op, e.path, str(e)) == (
        code,
        "it failed",
        "stat",
        "/x",
        "it failed",
    )
    assert e.code == cc.ErrorCode(code)
    assert repr(e) == f"{cls.__name__}('it failed', code={code}, op='stat', path='/x')"
    back = pickle.loads(pickle.dumps(e))
    assert (type(back), back.code, back.op, back.path) == (cls, code, "stat", "/x")
    assert cc._errors.error_for_code(code) is cls


def test_exception_defaults() -> None:
    e = cc.CCError("boom")
    assert (e.code, e.op, e.path) == (cc.ErrorCode.UNKNOWN, None, None)
    assert repr(e) == "CCError('boom', code=99)"
    assert cc._errors.error_for_code(12345) is cc.CCError
    # The package's IOError and TimeoutError are its own; IOError is also
    # an OSError (with the errno), TimeoutError not the builtin.
    assert issubclass(cc.IOError, OSError) and issubclass(cc.IOError, cc.CCError)
    assert cc.IOError("x").errno is None
    assert not issubclass(cc.IOError, FileNotFoundError)
    assert not issubclass(cc.TimeoutError, builtins.TimeoutError)


@pytest.mark.parametrize(
    ("number", "builtin"),
    [
        (errno.ENOENT, FileNotFoundError),
        (errno.EEXIST, FileExistsError),
        (errno.ENOTDIR, NotADirectoryError),
        (errno.EISDIR, IsADirectoryError),
        (errno.EACCES, PermissionError),
        (errno.EPERM, PermissionError),
        (errno.ENOSPC, OSError),
    ],
)
def test_io_errors_are_the_builtin_oserror_of_their_errno(
    number: int, builtin: type[OSError]
) -> None:
    e = cc._errors.io_error("read_file /f: gone", code=7, op="read_file", path="/f", errno=number)
    assert isinstance(e, builtin) and isinstance(e, cc.IOError) and isinstance(e, cc.CCError)
    assert (e.errno, e.strerror, e.filename) == (number, os.strerror(number), "/f")
    assert (str(e), e.code, e.op, e.path) == ("read_file /f: gone", 7, "read_file", "/f")
    assert repr(e).endswith(f"path='/f', errno={number})"), repr(e)
    if builtin is OSError:
        assert type(e) is cc.IOError
    # Caught as Python's own error and as this package's.
    with pytest.raises(builtin):
        raise e
    with pytest.raises(cc.IOError):
        raise e
    back = pickle.loads(pickle.dumps(e))
    assert (type(back), back.errno, back.filename, back.op) == (type(e), number, "/f", "read_file")


def test_invalid_handle_maps_to_invalid_handle_error(lib: None) -> None:
    bogus = cc.ImageSource(0xDEAD_BEEF, "bogus")
    with pytest.raises(cc.InvalidHandleError) as info:
        bogus.get_config()
    assert info.value.code == 1
    bogus.close()
    bogus.close()


def test_errors_carry_the_library_message(lib: None, tmp_path: Path) -> None:
    with cc.OCIClient(tmp_path / "store") as client:
        with pytest.raises(cc.IOError) as info:
            client.load_tar(tmp_path / "missing.tar")
        assert "missing.tar" in str(info.value)
        # A host errno travels too: a missing file is a FileNotFoundError.
        assert isinstance(info.value, FileNotFoundError), repr(info.value)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(cc.NetworkError):
            client.pull("127.0.0.1:1/nothing:latest")


# -- closed objects ------------------------------------------------------------


def test_closed_client(lib: None, tmp_path: Path) -> None:
    client = cc.OCIClient(tmp_path)
    assert repr(client) == f"<OCIClient {str(tmp_path)!r}>"
    with client as c:
        assert c is client and not c.closed
    assert client.closed
    client.close()  # idempotent
    assert repr(client).endswith(" closed>")
    calls: list[Callable[[], object]] = [
        lambda: client.pull("x"),
        lambda: client.load_dir("/x"),
        lambda: client.load_tar("/x"),
    ]
    for call in calls:
        with pytest.raises(cc.AlreadyClosedError) as info:
            call()
        assert info.value.code == 4
    assert info.value.op == "load_tar"


def test_cache_dir_says_where_the_store_is(
    lib: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with cc.OCIClient(tmp_path / "store") as client:
        assert client.cache_dir == str(tmp_path / "store")
    assert client.cache_dir == str(tmp_path / "store"), "known after close"
    monkeypatch.setenv("CC_CACHE_DIR", str(tmp_path / "cache"))
    with cc.OCIClient() as client:
        assert client.cache_dir == str(tmp_path / "cache" / "oci")
        assert repr(client) == f"<OCIClient {client.cache_dir!r}>"
    monkeypatch.chdir(tmp_path)
    with cc.OCIClient("relative") as client:
        assert client.cache_dir == str(tmp_path / "relative"), "made absolute"


def test_strings_with_nul_are_refused(lib: None, tmp_path: Path) -> None:
    with cc.OCIClient(tmp_path) as client:
        with pytest.raises(cc.InvalidArgumentError, match="NUL"):
            client.pull("alpine\0:latest")
        with pytest.raises(TypeError):
            client.pull(42)  # type: ignore[arg-type]


# -- options and value types -----------------------------------------------------


def test_instance_options_defaults() -> None:
    o = cc.InstanceOptions()
    assert (o.memory_mb, o.cpus, o.timeout_seconds, o.user, o.mounts, o.network, o.warm_start) == (
        512,
        1,
        None,
        None,
        None,
        True,
        True,
    )
    assert o.max_result_bytes == 1 << 30 == _lib.CC_DEFAULT_MAX_RESULT_BYTES
    assert repr(o) == (
        "InstanceOptions(memory_mb=512, cpus=1, timeout_seconds=None, user=None, mounts=None, "
        "network=True, network_policy=NetworkPolicy(allow_host=False, allow=(), deny=()), "
        "warm_start=True, disk_mb=4096, confinement='default', max_result_bytes=1073741824)"
    )
    c, _ = o._to_c()
    assert c.max_result_bytes == 1 << 30
    c, _ = cc.InstanceOptions(max_result_bytes=5 << 30)._to_c()
    assert c.max_result_bytes == 5 << 30
    for bad in (0, -1, 2**64):
        with pytest.raises(cc.InvalidArgumentError, match="max_result_bytes"):
            cc.InstanceOptions(max_result_bytes=bad)
    assert (c.memory_mb, c.cpus, c.timeout_seconds, c.user, c.mount_count) == (512, 1, 0.0, None, 0)
    assert c.disk_mb == 4096
    assert cc.InstanceOptions(disk_mb=128)._to_c()[0].disk_mb == 128
    assert (c.no_network, c.no_warm_start) == (False, False)
    c, _ = cc.InstanceOptions(network=False, warm_start=False)._to_c()
    assert (c.no_network, c.no_warm_start) == (True, True)
    assert [k.name for k in cc.StartKind] == ["COLD", "BUILT", "WARM", "RESTORED"]


def test_instance_options_mounts() -> None:
    o = cc.InstanceOptions(
        memory_mb=256,
        cpus=2,
        timeout_seconds=1.5,
        user="nobody",
        mounts=[cc.Mount("/a", "/mnt/a"), ("/b", "/mnt/b"), (Path("/c"), "/mnt/c", True)],  # type: ignore[list-item]
    )
    assert o.mounts == [
        cc.Mount("/a", "/mnt/a", False),
        cc.Mount("/b", "/mnt/b", False),
        cc.Mount("/c", "/mnt/c", True),
    ]
    c, keep = o._to_c()
    assert (c.memory_mb, c.cpus, c.timeout_seconds, c.user, c.mount_count) == (
        256,
        2,
        1.5,
        b"nobody",
        3,
    )
    assert [
        (c.mounts[i].host_path, c.mounts[i].guest_path, c.mounts[i].writable) for i in range(3)
    ] == [
        (b"/a", b"/mnt/a", False),
        (b"/b", b"/mnt/b", False),
        (b"/c", b"/mnt/c", True),
    ]
    assert keep


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"memory_mb": 0}, cc.InvalidArgumentError),
        ({"memory_mb": -1}, cc.InvalidArgumentError),
        ({"memory_mb": 2**32}, cc.InvalidArgumentError),
        ({"memory_mb": "512"}, TypeError),
        ({"memory_mb": True}, TypeError),
        ({"cpus": 0}, cc.InvalidArgumentError),
        ({"disk_mb": 0}, cc.InvalidArgumentError),
        ({"confinement": "loose"}, cc.InvalidArgumentError),
        ({"confinement": None}, cc.InvalidArgumentError),
        ({"disk_mb": 2**32}, cc.InvalidArgumentError),
        ({"disk_mb": "4096"}, TypeError),
        ({"cpus": 1.5}, TypeError),
        ({"timeout_seconds": 0}, cc.InvalidArgumentError),
        ({"timeout_seconds": -3.0}, cc.InvalidArgumentError),
        ({"timeout_seconds": float("nan")}, cc.InvalidArgumentError),
        ({"timeout_seconds": "5"}, TypeError),
        ({"user": 0}, TypeError),
        ({"mounts": "/a:/b"}, TypeError),
        ({"mounts": [("/a",)]}, TypeError),
        ({"mounts": [("/a", "relative")]}, cc.InvalidArgumentError),
        ({"mounts": [("/a", "/")]}, cc.InvalidArgumentError),
        ({"mounts": [("", "/mnt")]}, cc.InvalidArgumentError),
    ],
)
def test_instance_options_validation(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        cc.InstanceOptions(**kwargs)  # type: ignore[arg-type]


def test_network_policy() -> None:
    p = cc.NetworkPolicy()
    assert (p.allow_host, p.allow, p.deny) == (False, (), ())
    p = cc.NetworkPolicy(allow_host=True, allow=["10.0.0.0/8", "*:53"], deny=("1.2.3.4:22",))
    assert p.allow == ("10.0.0.0/8", "*:53") and p.deny == ("1.2.3.4:22",)
    assert hash(p) == hash(cc.NetworkPolicy(True, ("10.0.0.0/8", "*:53"), ["1.2.3.4:22"]))
    c, keep = cc.InstanceOptions(network_policy=p)._to_c()
    assert c.allow_host is True
    assert [c.net_allow[i] for i in range(c.net_allow_count)] == [b"10.0.0.0/8", b"*:53"]
    assert [c.net_deny[i] for i in range(c.net_deny_count)] == [b"1.2.3.4:22"]
    assert keep
    c, _ = cc.InstanceOptions()._to_c()
    assert (c.allow_host, c.net_allow_count, c.net_deny_count) == (False, 0, 0)
    assert not c.net_allow and not c.net_deny
    # A plain dict works too.
    o = cc.InstanceOptions(network_policy={"allow_host": True, "deny": ["10.0.2.2:22"]})
    assert o.network_policy == cc.NetworkPolicy(allow_host=True, deny=("10.0.2.2:22",))
    from crumblecracker import aio

    assert aio.NetworkPolicy is cc.NetworkPolicy


@pytest.mark.parametrize(
    ("policy", "error", "named"),
    [
        ({"allow_hosts": True}, cc.InvalidArgumentError, "'allow_hosts'"),
        ({"allow": ["1.2.3.4"], "ports": [80]}, cc.InvalidArgumentError, "'ports'"),
        ({"allow_host": "yes"}, TypeError, "allow_host"),
        ({"allow": "10.0.0.0/8"}, TypeError, "allow"),
        ({"deny": [443]}, TypeError, "deny"),
        ("10.0.0.0/8", TypeError, "network_policy"),
    ],
)
def test_network_policy_validation(policy: object, error: type[Exception], named: str) -> None:
    with pytest.raises(error, match=re.escape(named)):
        cc.InstanceOptions(network_policy=policy)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("allow", "deny", "named"),
    [
        (["10.0.0.1/8"], [], "host bits set"),
        (["10.0.0.0/33"], [], 'prefix "33"'),
        (["10.0.0/8"], [], '"10.0.0" is not an IPv4 address'),
        ([], ["1.2.3.4:65536"], 'port "65536"'),
        ([], ["1.2.3.4:0"], 'port "0"'),
        ([], ["*:90-80"], "reversed"),
        ([], [""], "empty"),
    ],
)
def test_bad_network_rules_are_invalid_arguments(
    lib: None, allow: list[str], deny: list[str], named: str
) -> None:
    # Options are checked before the source, so a bogus one needs no VM.
    bogus = cc.ImageSource(0xDEAD_BEEF, "bogus")
    options = cc.InstanceOptions(network_policy=cc.NetworkPolicy(allow=allow, deny=deny))
    rule = (allow or deny)[0]
    with pytest.raises(cc.InvalidArgumentError) as info:
        cc.Instance(bogus, options)
    assert f'"{rule}"' in str(info.value) and named in str(info.value), str(info.value)
    # Good rules get as far as the bogus source.
    good = cc.InstanceOptions(network_policy={"allow": ["10.0.0.0/8:80"], "deny": ["*:25"]})
    with pytest.raises(cc.InvalidHandleError):
        cc.Instance(bogus, good)


def test_options_are_checked_again_when_used() -> None:
    o = cc.InstanceOptions()
    o.memory_mb = 0
    with pytest.raises(cc.InvalidArgumentError):
        o._to_c()


def test_pull_options() -> None:
    o = cc.PullOptions()
    assert (o.platform, o.auth, o.policy) == (None, None, cc.PullPolicy.IF_NOT_PRESENT)
    o = cc.PullOptions(platform="linux/amd64", auth=("user", "s3cret"), policy=1)  # type: ignore[arg-type]
    assert o.auth == cc.Auth("user", "s3cret")
    assert o.policy is cc.PullPolicy.ALWAYS
    assert "s3cret" not in repr(o) and "s3cret" not in repr(o.auth)
    c, _ = o._to_c()
    assert (c.platform, c.username, c.password, c.policy) == (b"linux/amd64", b"user", b"s3cret", 1)
    o = cc.PullOptions(auth=cc.Auth("u", "p"), policy=cc.PullPolicy.NEVER)
    assert o._to_c()[0].policy == 2
    with pytest.raises(cc.InvalidArgumentError):
        cc.PullOptions(policy=7)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cc.PullOptions(auth=("only-user",))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cc.PullOptions(auth="user:pass")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cc.PullOptions(platform=3)  # type: ignore[arg-type]
    c, _ = cc.PullOptions()._to_c()
    assert (c.max_layer_ratio, c.max_layer_bytes, c.max_image_bytes) == (100, 32 << 30, 32 << 30)
    c, _ = cc.PullOptions(max_layer_ratio=5, max_image_bytes=1 << 20)._to_c()
    assert (c.max_layer_ratio, c.max_image_bytes) == (5, 1 << 20)
    for field in ("max_layer_ratio", "max_layer_bytes", "max_image_bytes"):
        with pytest.raises(cc.InvalidArgumentError, match=field):
            cc.PullOptions(**{field: 0})  # type: ignore[arg-type]


def test_enums_and_flags() -> None:
    assert [p.name for p in cc.PullPolicy] == ["IF_NOT_PRESENT", "ALWAYS", "NEVER"]
    assert [w.name for w in cc.SeekWhence] == ["SET", "CUR", "END"]
    assert int(cc.SeekWhence.SET) == 0 and int(cc.SeekWhence.END) == 2
    assert cc.O_RDONLY == 0 and cc.O_RDWR | cc.O_CREATE | cc.O_TRUNC == 2 | 512 | 1024


def test_value_type_reprs() -> None:
    info = cc.FileInfo("a.txt", 3, 0o100644, 1.5, False, False, 1000, 1000)
    assert info.permissions == 0o644
    assert repr(info) == (
        "FileInfo(name='a.txt', size=3, mode=33188, mtime=1.5, is_dir=False, "
        "is_symlink=False, uid=1000, gid=1000)"
    )
    assert (
        repr(cc.DirEntry("bin", True, 0o40755)) == "DirEntry(name='bin', is_dir=True, mode=16877)"
    )
    cfg = cc.ImageConfig("amd64", "linux", ["A=b"], None, [], ["sh"], None, {"k": "v"})
    assert repr(cfg).startswith("ImageConfig(architecture='amd64', os='linux', env=['A=b']")
    p = cc.PullProgress(1, 2, "sha256:x", 0, 1, 10.0, None)
    assert "current=1, total=2" in repr(p)
    assert repr(cc.Mount("/h", "/g")) == "Mount(host_path='/h', guest_path='/g', writable=False)"


def test_public_names() -> None:
    # Every name the seed README uses, and the networking classes.
    for name in [
        "init", "shutdown", "api_version", "api_version_compatible", "supports_hypervisor",
        "query_capabilities", "guest_protocol_version", "OCIClient", "Instance", "Cmd", "File",
        "Conn", "InstanceOptions", "PullOptions", "PullPolicy", "FileInfo", "DirEntry",
        "ImageConfig", "Capabilities", "SeekWhence", "O_RDONLY", "O_WRONLY", "O_RDWR",
        "O_APPEND", "O_CREATE", "O_TRUNC", "O_EXCL", "CCError", "InvalidHandleError",
        "InvalidArgumentError", "NotRunningError", "AlreadyClosedError", "TimeoutError",
        "HypervisorUnavailableError", "IOError", "NetworkError", "CancelledError",
        "Snapshot", "ImageSource", "Mount", "Auth", "PullProgress", "Listener", "ExposedPort",
    ]:  # fmt: skip
        assert hasattr(cc, name), name
    assert sorted(cc.__all__) == sorted(set(cc.__all__))
    for name in cc.__all__:
        assert hasattr(cc, name), name
    for method in [
        "wait", "close", "read_file", "write_file", "stat", "lstat", "mkdir", "mkdir_all",
        "remove", "remove_all", "read_dir", "rename", "symlink", "readlink", "chmod", "chown",
        "chtimes", "open", "create", "open_file", "command", "entrypoint_command",
        "snapshot_filesystem", "listen", "dial", "expose", "set_network_enabled",
    ]:  # fmt: skip
        assert callable(getattr(cc.Instance, method)), method
    for method in [
        "set_dir", "set_env", "get_env", "environ", "run", "output", "combined_output",
        "start", "wait", "stdin_pipe", "stdout_pipe", "stderr_pipe", "kill", "close",
    ]:  # fmt: skip
        assert callable(getattr(cc.Cmd, method)), method
    for method in ["read", "write", "seek", "stat", "truncate", "sync", "close"]:
        assert callable(getattr(cc.File, method)), method
    for method in ["read", "write", "close_write", "close"]:
        assert callable(getattr(cc.Conn, method)), method
    for cls, props in [
        (cc.Conn, ["local_addr", "remote_addr", "closed"]),
        (cc.Listener, ["addr", "port", "closed"]),
        (cc.ExposedPort, ["host_port", "guest_port", "closed"]),
    ]:
        for prop in props:
            assert isinstance(getattr(cls, prop), property), (cls, prop)
    for method in ["accept", "close", "__enter__", "__exit__"]:
        assert callable(getattr(cc.Listener, method)), method
    for method in ["close", "__enter__", "__exit__"]:
        assert callable(getattr(cc.ExposedPort, method)), method


def test_package_is_typed() -> None:
    assert (Path(cc.__file__).parent / "py.typed").exists()


def test_readme_quick_start_is_the_offline_example() -> None:
    readme = (PYTHON_DIR / "README.md").read_text()
    start = readme.index("## Quick Start")
    block = readme[start:].split("```python\n", 1)[1].split("```", 1)[0]
    example = (PYTHON_DIR / "examples" / "quickstart_offline.py").read_text()
    body = example.split("# --- the Quick Start", 1)[1].split("\n", 1)[1].lstrip("\n")
    header = "import crumblecracker as cc\n\n"
    assert block.startswith(header)
    assert (
        body.replace("client.pull(IMAGE,", 'client.pull("alpine:latest",') == block[len(header) :]
    )
    seed = WORKSPACE.parent / "shared" / "seed" / "crumblecracker-python-README.md"
    if seed.exists():
        seed_text = seed.read_text()
        seed_block = seed_text[seed_text.index("## Quick Start") :]
        seed_block = seed_block.split("```python\n", 1)[1].split("```", 1)[0]
        assert block == seed_block


# -- networking without a VM -----------------------------------------------------


def unbooted_instance() -> cc.Instance:
    """An Instance object that never booted: enough to see arguments refused
    before any call into the library."""
    inst = cc.Instance.__new__(cc.Instance)
    inst._handle = 0
    inst._closed = False
    return inst


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1,), cc.InvalidArgumentError),
        ((65536,), cc.InvalidArgumentError),
        ((2**16 + 8080,), cc.InvalidArgumentError),  # c_uint16 would make it 8080
        ((8080, -1), cc.InvalidArgumentError),
        ((8080, 65536), cc.InvalidArgumentError),
        ((8080, 2**32), cc.InvalidArgumentError),
        (("8080",), TypeError),
        ((8080.0,), TypeError),
        ((True,), TypeError),
        ((8080, None), TypeError),
    ],
)
def test_expose_port_range(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        unbooted_instance().expose(*args)  # type: ignore[arg-type]
    if error is cc.InvalidArgumentError:
        assert "between 0 and 65535" in str(info.value)
        assert info.value.code == cc.ErrorCode.INVALID_ARGUMENT


def test_check_port() -> None:
    from crumblecracker._net import check_port

    assert check_port(0, "p") == 0 and check_port(65535, "p") == 65535
    with pytest.raises(cc.InvalidArgumentError, match="host_port must be between 0 and 65535"):
        check_port(65536, "host_port")


def test_listen_and_dial_refuse_bad_strings(lib: None) -> None:
    inst = unbooted_instance()
    with pytest.raises(cc.InvalidArgumentError, match="NUL"):
        inst.listen("tcp", ":80\0")
    with pytest.raises(TypeError):
        inst.dial("tcp", 80)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        inst.listen(None, ":80")  # type: ignore[arg-type]


def test_network_objects_on_bogus_handles(lib: None) -> None:
    inst = unbooted_instance()
    exposed = cc.ExposedPort(0xDEAD_BEEF, inst, 8080, 40000)
    assert (exposed.guest_port, exposed.host_port) == (8080, 40000)
    assert repr(exposed) == "<ExposedPort 127.0.0.1:40000 -> guest port 8080 open>"
    with pytest.raises(cc.InvalidHandleError):
        exposed.close()  # the library does not know the handle
    assert exposed.closed
    exposed.close()  # idempotent
    assert repr(exposed).endswith(" closed>")
    with pytest.raises(cc.InvalidHandleError):
        cc.Listener(0xDEAD_BEEF, inst)  # asks the library for its address
    conn = cc.Conn(0xDEAD_BEEF, inst, "stdout of ['x']")
    assert (conn.local_addr, conn.remote_addr) == (None, None)
    assert repr(conn) == "<Conn stdout of ['x'] open>"
    with pytest.raises(cc.InvalidHandleError):
        conn.close_write()
    with pytest.raises(cc.InvalidHandleError):
        conn.close()
    conn.close()  # closed now: nothing
    with pytest.raises(cc.AlreadyClosedError) as info:
        conn.close_write()
    assert info.value.op == "close_write"


def test_cancel_token_lifecycle_and_use_after_close(lib: None, client: cc.OCIClient) -> None:
    with cc.CancelToken() as token:
        assert not token.is_cancelled
        token.cancel()
        token.cancel()
        assert token.is_cancelled
        # Cancelled before the call: it does not start, and names itself.
        with pytest.raises(cc.CancelledError, match="load cancelled") as info:
            client.load_tar("/nonexistent.tar", cancel=token)
        assert info.value.code == cc.ErrorCode.CANCELLED
    assert token.closed
    for use in (token.cancel, lambda: token.is_cancelled):
        with pytest.raises(cc.AlreadyClosedError):
            use()
    with pytest.raises(cc.AlreadyClosedError):
        client.load_dir("/nonexistent", cancel=token)
    token.close()
    with pytest.raises(TypeError):
        client.load_tar("/nonexistent.tar", cancel="yes")  # type: ignore[arg-type]
