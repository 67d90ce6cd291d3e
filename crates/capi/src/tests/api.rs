//! The library calls, errors, NULL arguments, panics and shutdown.

use std::ffi::{c_char, c_void, CStr};
use std::ptr;

use super::{exclusive, shared};
use crate::alloc::*;
use crate::cancel::*;
use crate::cmd::*;
use crate::error::*;
use crate::ffi::{entry, guard};
use crate::fs::*;
use crate::instance::*;
use crate::library::*;
use crate::oci::*;
use crate::snapshot::*;

fn text(p: *const c_char) -> Option<String> {
    // SAFETY: the library's strings are NUL-terminated.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Runs `call` with an error struct; returns its code and the error's
/// fields (freed).
fn failing(call: impl FnOnce(*mut cc_error) -> cc_error_code) -> (cc_error_code, Error) {
    let mut err = cc_error::default();
    let code = call(&mut err);
    let seen = Error {
        code: err.code,
        message: text(err.message).unwrap_or_default(),
        op: text(err.op),
        path: text(err.path),
        os_errno: err.os_errno,
    };
    // SAFETY: filled by the library (or still zeroed).
    unsafe { cc_error_free(&mut err) };
    assert!(err.message.is_null() && err.op.is_null() && err.path.is_null());
    assert_eq!(
        (err.size, err.os_errno),
        (std::mem::size_of::<cc_error>(), 0)
    );
    (code, seen)
}

#[derive(Debug)]
struct Error {
    code: cc_error_code,
    message: String,
    op: Option<String>,
    path: Option<String>,
    os_errno: i32,
}

#[test]
fn versions() {
    // Version queries work without cc_init.
    // SAFETY: a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(cc_api_version()) }
        .to_str()
        .unwrap();
    assert_eq!(
        v,
        format!("{CC_API_VERSION_MAJOR}.{CC_API_VERSION_MINOR}.{CC_API_VERSION_PATCH}")
    );
    assert!(cc_api_version_compatible(0, 0));
    assert!(cc_api_version_compatible(0, 1));
    assert!(!cc_api_version_compatible(0, 2));
    assert!(!cc_api_version_compatible(1, 0));
    assert_eq!(cc_guest_protocol_version(), cc::GUEST_PROTOCOL_VERSION);
}

#[test]
fn error_codes_equal_the_core_numbers() {
    use cc::ErrorCode as E;
    for (ours, core) in [
        (CC_OK, E::Ok),
        (CC_ERR_INVALID_HANDLE, E::InvalidHandle),
        (CC_ERR_INVALID_ARGUMENT, E::InvalidArgument),
        (CC_ERR_NOT_RUNNING, E::NotRunning),
        (CC_ERR_ALREADY_CLOSED, E::AlreadyClosed),
        (CC_ERR_TIMEOUT, E::Timeout),
        (CC_ERR_HYPERVISOR_UNAVAILABLE, E::HypervisorUnavailable),
        (CC_ERR_IO, E::Io),
        (CC_ERR_NETWORK, E::Network),
        (CC_ERR_CANCELLED, E::Cancelled),
        (CC_ERR_UNKNOWN, E::Unknown),
    ] {
        assert_eq!(ours as i32, core as i32, "{ours:?}");
        assert_eq!(cc_error_code::from(core), ours);
    }
    assert_eq!(
        [
            CC_O_RDONLY,
            CC_O_WRONLY,
            CC_O_RDWR,
            CC_O_APPEND,
            CC_O_CREATE,
            CC_O_TRUNC,
            CC_O_EXCL
        ],
        [
            cc::O_RDONLY,
            cc::O_WRONLY,
            cc::O_RDWR,
            cc::O_APPEND,
            cc::O_CREATE,
            cc::O_TRUNC,
            cc::O_EXCL
        ]
    );
}

#[test]
fn core_errors_keep_code_op_and_path() {
    let e = cc::Error::Io {
        op: "remove".into(),
        path: "/no/such".into(),
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
    };
    let f = Failure::from(e);
    assert_eq!(f.code, CC_ERR_IO);
    assert_eq!(
        (f.op.as_deref(), f.path.as_deref()),
        (Some("remove"), Some("/no/such"))
    );
    assert!(f.message.contains("No such file"), "{}", f.message);
    assert_eq!(f.os_errno, libc::ENOENT);
    let f = Failure::from(cc::Error::AlreadyClosed);
    assert_eq!(
        (f.code, f.op, f.path, f.os_errno),
        (CC_ERR_ALREADY_CLOSED, None, None, 0)
    );
}

#[test]
fn errors_fill_only_on_failure_and_free_cleanly() {
    let _g = shared();
    // A failure fills every field.
    let (code, e) = failing(|err| {
        guard(err, || {
            Err(Failure {
                code: CC_ERR_IO,
                message: "stat /x: gone".into(),
                op: Some("stat".into()),
                path: Some("/x".into()),
                os_errno: libc::ENOENT,
            })
        })
    });
    assert_eq!((code, e.code), (CC_ERR_IO, CC_ERR_IO));
    assert_eq!(e.message, "stat /x: gone");
    assert_eq!(
        (e.op.as_deref(), e.path.as_deref(), e.os_errno),
        (Some("stat"), Some("/x"), libc::ENOENT)
    );

    // Success leaves the struct alone (here: a marker code).
    let mut err = cc_error {
        code: CC_ERR_TIMEOUT,
        ..cc_error::default()
    };
    assert_eq!(guard(&mut err, || Ok(())), CC_OK);
    assert_eq!(err.code, CC_ERR_TIMEOUT);
    assert!(err.message.is_null());

    // NULL `err` is fine, as are freeing NULL and freeing twice.
    assert_eq!(
        guard(ptr::null_mut(), || Err(Failure::invalid("x"))),
        CC_ERR_INVALID_ARGUMENT
    );
    // SAFETY: NULL and a zeroed struct are both allowed.
    unsafe {
        cc_error_free(ptr::null_mut());
        let mut err = cc_error::default();
        cc_error_free(&mut err);
        cc_error_free(&mut err);
    }
    // A NUL inside a message does not truncate it silently.
    let (_, e) = failing(|err| guard(err, || Err(Failure::invalid("a\0b"))));
    assert_eq!(e.message, "a\\0b");
}

#[test]
fn panics_become_unknown_errors() {
    let _g = shared();
    let (code, e) = failing(|err| entry(err, || panic!("boom {}", 42)));
    assert_eq!(code, CC_ERR_UNKNOWN);
    assert!(e.message.contains("boom 42"), "{}", e.message);
    let (code, e) = failing(|err| guard(err, || std::panic::panic_any(7u8)));
    assert_eq!(code, CC_ERR_UNKNOWN);
    assert!(e.message.contains("unknown panic payload"), "{}", e.message);
}

#[test]
fn a_sigpipe_raised_during_a_call_is_swallowed() {
    let _g = shared();
    // Writing to a socket whose peer is gone raises SIGPIPE, which would
    // end a C program; inside a call it is blocked and consumed.
    let code = guard(ptr::null_mut(), || {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(b);
        let r = std::io::Write::write(&mut &a, b"x");
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
        // SAFETY: raise() on this thread; SIGPIPE is blocked here.
        unsafe { libc::raise(libc::SIGPIPE) };
        Ok(())
    });
    assert_eq!(code, CC_OK);
    // SAFETY: queries this thread's mask and pending set.
    unsafe {
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        assert_eq!(libc::sigismember(&pending, libc::SIGPIPE), 0);
        let mut mask: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, ptr::null(), &mut mask);
        assert_eq!(libc::sigismember(&mask, libc::SIGPIPE), 0, "mask restored");
    }
}

/// Malformed CIDRs and ports out of range, in either list, are refused
/// before booting with a message naming the rule and where it was. `opts`
/// holds no pointers but NULL ones.
fn bad_network_rules_are_invalid_arguments(source: cc_source, opts: cc_instance_options) {
    let opts = cc_instance_options {
        timeout_seconds: 0.0,
        ..opts
    };
    let good = [c"10.0.0.0/8".as_ptr(), c"*:53".as_ptr()];
    for (rule, why) in [
        (c"10.0.0.1/8", "host bits set"),
        (c"10.0.0.0/40", "prefix \"40\""),
        (c"999.0.0.1", "not an IPv4 address"),
        (c"1.2.3.4:65536", "port \"65536\""),
        (c"1.2.3.4:0", "port \"0\""),
        (c"1.2.3.4:443-80", "reversed"),
        (c"", "empty"),
    ] {
        let list = [good[0], good[1], rule.as_ptr()];
        let text = format!("{:?}", rule.to_str().unwrap());
        for deny in [false, true] {
            let opts = if deny {
                cc_instance_options {
                    net_deny: list.as_ptr(),
                    net_deny_count: list.len(),
                    ..opts
                }
            } else {
                cc_instance_options {
                    net_allow: list.as_ptr(),
                    net_allow_count: list.len(),
                    ..opts
                }
            };
            // SAFETY: `opts` points at `list`, live for the call.
            let (code, e) = failing(|err| unsafe { cc_instance_new(source, &opts, &mut 0, err) });
            assert_eq!(code, CC_ERR_INVALID_ARGUMENT, "{}", e.message);
            let field = if deny { "net_deny" } else { "net_allow" };
            assert!(
                e.message.contains(&format!("options->{field}[2]"))
                    && e.message.contains(&text)
                    && e.message.contains(why),
                "{}",
                e.message
            );
        }
    }
    let opts = cc_instance_options {
        net_allow_count: 1,
        ..opts
    };
    // SAFETY: NULL with a count is what is being refused.
    let (code, e) = failing(|err| unsafe { cc_instance_new(source, &opts, &mut 0, err) });
    assert_eq!(
        (code, e.message.as_str()),
        (CC_ERR_INVALID_ARGUMENT, "`options->net_allow` is NULL")
    );
    // Good rules get past the check to the missing root directory.
    let opts = cc_instance_options {
        allow_host: true,
        net_allow: good.as_ptr(),
        net_allow_count: good.len(),
        net_deny: good.as_ptr(),
        net_deny_count: 1,
        ..opts
    };
    // SAFETY: `opts` points at `good`, live for the call.
    let (code, e) = failing(|err| unsafe { cc_instance_new(source, &opts, &mut 0, err) });
    assert_ne!(code, CC_ERR_INVALID_ARGUMENT, "{}", e.message);
}

#[test]
fn null_and_bad_arguments_are_invalid_arguments() {
    let _g = shared();
    // SAFETY: every pointer is NULL or valid; that is the point.
    unsafe {
        let (code, e) = failing(|err| cc_query_capabilities(ptr::null_mut(), err));
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT);
        assert_eq!(e.message, "`out` is NULL");
        let (code, e) = failing(|err| cc_source_from_dir(ptr::null(), &mut 0, err));
        assert_eq!(
            (code, e.message.as_str()),
            (CC_ERR_INVALID_ARGUMENT, "`path` is NULL")
        );
        let bad = [0xffu8, 0xfe, 0];
        let (code, e) = failing(|err| cc_source_from_dir(bad.as_ptr().cast(), &mut 0, err));
        assert_eq!(
            (code, e.message.as_str()),
            (CC_ERR_INVALID_ARGUMENT, "`path` is not valid UTF-8")
        );
        let (code, _) = failing(|err| cc_cancel_token_new(ptr::null_mut(), err));
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT);

        // Arrays: NULL with a count, and a NULL element.
        let args = [c"a".as_ptr(), ptr::null()];
        let (code, e) =
            failing(|err| cc_instance_command(1, c"echo".as_ptr(), args.as_ptr(), 2, &mut 0, err));
        assert_eq!(
            (code, e.message.as_str()),
            (CC_ERR_INVALID_ARGUMENT, "`args[1]` is NULL")
        );
        let (code, e) =
            failing(|err| cc_instance_command(1, c"echo".as_ptr(), ptr::null(), 3, &mut 0, err));
        assert_eq!(
            (code, e.message.as_str()),
            (CC_ERR_INVALID_ARGUMENT, "`args` is NULL")
        );
        // Arguments are checked before handles.
        let (code, _) = failing(|err| cc_instance_stat(0, ptr::null(), ptr::null_mut(), err));
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT);
        let (code, _) = failing(|err| cc_instance_stat(0, c"/".as_ptr(), &mut fake_info(), err));
        assert_eq!(code, CC_ERR_INVALID_HANDLE);

        // Parks: a path is needed, and what is not a park is refused.
        let (code, e) = failing(|err| cc_instance_park(1, ptr::null(), ptr::null_mut(), err));
        assert_eq!(
            (code, e.message.as_str()),
            (CC_ERR_INVALID_ARGUMENT, "`path` is NULL")
        );
        let (code, _) = failing(|err| cc_instance_park(0, c"/p".as_ptr(), ptr::null_mut(), err));
        assert_eq!(code, CC_ERR_INVALID_HANDLE);
        let (code, e) =
            failing(|err| cc_instance_restore(c"/nonexistent".as_ptr(), 0.0, &mut 0, err));
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT);
        assert!(
            e.message.contains("is not a parked instance"),
            "{}",
            e.message
        );
        let (code, _) = failing(|err| cc_instance_restore(c"/".as_ptr(), -1.0, &mut 0, err));
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT);

        // Options: zero means default, nonsense is refused before booting.
        let mut source = 0;
        assert_eq!(
            cc_source_from_dir(c"/nonexistent".as_ptr(), &mut source, ptr::null_mut()),
            CC_OK
        );
        let opts = cc_instance_options {
            size: std::mem::size_of::<cc_instance_options>(),
            memory_mb: 0,
            cpus: 0,
            timeout_seconds: -1.0,
            user: ptr::null(),
            mounts: ptr::null(),
            mount_count: 0,
            no_network: false,
            no_warm_start: false,
            allow_host: false,
            net_allow: ptr::null(),
            net_allow_count: 0,
            net_deny: ptr::null(),
            net_deny_count: 0,
            disk_mb: 0,
            confinement: 7,
            max_result_bytes: 0,
        };
        let (code, e) = failing(|err| cc_instance_new(source, &opts, &mut 0, err));
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT, "{}", e.message);
        assert!(e.message.contains("confinement 7"), "{}", e.message);
        let opts = cc_instance_options {
            confinement: CC_CONFINE_DEFAULT,
            ..opts
        };
        bad_network_rules_are_invalid_arguments(source, opts);
        let tiny_disk = cc_instance_options {
            timeout_seconds: 0.0,
            disk_mb: 1,
            ..opts
        };
        let (code, e) = failing(|err| cc_instance_new(source, &tiny_disk, &mut 0, err));
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT, "{}", e.message);
        assert!(e.message.contains("disk_mb 1"), "{}", e.message);
        let opts = cc_instance_options {
            timeout_seconds: 0.0,
            mount_count: 1,
            ..opts
        };
        let (code, e) = failing(|err| cc_instance_new(source, &opts, &mut 0, err));
        assert_eq!(
            (code, e.message.as_str()),
            (CC_ERR_INVALID_ARGUMENT, "`options->mounts` is NULL")
        );
        let mount = cc_mount {
            host_path: c"/nonexistent/host/dir".as_ptr(),
            guest_path: c"/mnt".as_ptr(),
            writable: false,
        };
        let opts = cc_instance_options {
            mounts: &mount,
            ..opts
        };
        let (code, e) = failing(|err| cc_instance_new(source, &opts, &mut 0, err));
        assert_eq!(code, CC_ERR_IO, "a missing mount source: {e:?}");
        assert_eq!(e.path.as_deref(), Some("/nonexistent/host/dir"));
        let (code, _) = failing(|err| cc_source_image_config(source, &mut ptr::null_mut(), err));
        assert_eq!(
            code, CC_ERR_INVALID_ARGUMENT,
            "a directory has no image config"
        );
        assert_eq!(cc_source_free(source), CC_OK);

        // Pull options.
        let mut client = 0;
        let dir = std::env::temp_dir().join(format!("cc-capi-api-{}", std::process::id()));
        let dir_c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        assert_eq!(
            cc_oci_client_new(dir_c.as_ptr(), &mut client, ptr::null_mut()),
            CC_OK
        );
        let mut where_ = ptr::null_mut();
        assert_eq!(
            cc_oci_client_cache_dir(client, &mut where_, ptr::null_mut()),
            CC_OK
        );
        assert_eq!(text(where_).as_deref(), dir.to_str());
        cc_string_free(where_);
        let (code, e) = failing(|err| cc_oci_client_cache_dir(client, ptr::null_mut(), err));
        assert_eq!(
            (code, e.code),
            (CC_ERR_INVALID_ARGUMENT, CC_ERR_INVALID_ARGUMENT)
        );
        let opts = cc_pull_options {
            platform: ptr::null(),
            username: ptr::null(),
            password: ptr::null(),
            policy: 7,
            max_layer_ratio: 0,
            max_layer_bytes: 0,
            max_image_bytes: 0,
        };
        let pull = |opts: &cc_pull_options, err| {
            cc_oci_pull(
                client,
                c"x".as_ptr(),
                opts,
                None,
                ptr::null_mut(),
                0,
                &mut 0,
                err,
            )
        };
        let (code, e) = failing(|err| pull(&opts, err));
        assert_eq!(
            (code, e.message.as_str()),
            (CC_ERR_INVALID_ARGUMENT, "unknown pull policy 7")
        );
        let opts = cc_pull_options {
            policy: CC_PULL_NEVER,
            username: c"u".as_ptr(),
            ..opts
        };
        let (code, e) = failing(|err| pull(&opts, err));
        assert_eq!(
            (code, e.message.as_str()),
            (CC_ERR_INVALID_ARGUMENT, "`options->password` is NULL")
        );
        let opts = cc_pull_options {
            username: ptr::null(),
            platform: c"not a platform".as_ptr(),
            ..opts
        };
        assert_eq!(failing(|err| pull(&opts, err)).0, CC_ERR_INVALID_ARGUMENT);
        // Policy NEVER and an empty store: not found, without the network.
        let opts = cc_pull_options {
            platform: ptr::null(),
            ..opts
        };
        let (code, e) = failing(|err| pull(&opts, err));
        assert_ne!(code, CC_OK, "{e:?}");

        // A cancelled token stops a pull before it starts.
        let mut token = 0;
        assert_eq!(cc_cancel_token_new(&mut token, ptr::null_mut()), CC_OK);
        assert_eq!(cc_cancel_token_cancel(token, ptr::null_mut()), CC_OK);
        let (code, _) = failing(|err| {
            cc_oci_pull(
                client,
                c"127.0.0.1:1/x:1".as_ptr(),
                ptr::null(),
                None,
                ptr::null_mut(),
                token,
                &mut 0,
                err,
            )
        });
        assert_eq!(code, CC_ERR_CANCELLED);
        assert_eq!(cc_cancel_token_free(token), CC_OK);

        // A closed client.
        assert_eq!(cc_oci_client_close(client, ptr::null_mut()), CC_OK);
        assert_eq!(
            cc_oci_client_close(client, ptr::null_mut()),
            CC_OK,
            "idempotent"
        );
        let (code, _) =
            failing(|err| cc_oci_load_dir(client, c"/nonexistent".as_ptr(), &mut 0, err));
        assert_eq!(code, CC_ERR_ALREADY_CLOSED);
        assert_eq!(cc_oci_client_free(client), CC_OK);
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn fake_info() -> cc_file_info {
    cc_file_info {
        name: ptr::null_mut(),
        size: 0,
        mode: 0,
        uid: 0,
        gid: 0,
        mtime_unix: 0,
        mtime_nsec: 0,
        is_dir: false,
        is_symlink: false,
    }
}

#[test]
fn loading_a_missing_layout_is_an_io_error_with_the_path() {
    let _g = shared();
    let dir = std::env::temp_dir().join(format!("cc-capi-load-{}", std::process::id()));
    let dir_c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: valid strings and slots.
    unsafe {
        let mut client = 0;
        assert_eq!(
            cc_oci_client_new(dir_c.as_ptr(), &mut client, ptr::null_mut()),
            CC_OK
        );
        let mut source = 0;
        let (code, e) = failing(|err| {
            cc_oci_load_dir(client, c"/nonexistent/layout".as_ptr(), &mut source, err)
        });
        assert_eq!(code, CC_ERR_IO, "{e:?}");
        assert_eq!(source, 0);
        assert!(e.message.contains("/nonexistent/layout"), "{e:?}");
        assert_eq!(cc_oci_client_free(client), CC_OK);
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn blank_capabilities() -> cc_capabilities {
    cc_capabilities {
        size: std::mem::size_of::<cc_capabilities>(),
        architecture: ptr::null(),
        hypervisor_available: false,
        accelerator: ptr::null(),
        confined_seccomp: false,
        confined_namespaces: false,
        sandbox_uid: u32::MAX,
        confinement_gaps: ptr::null(),
        hardware_accelerated: false,
        kernel_hash: ptr::null(),
    }
}

#[test]
fn capabilities_and_hypervisor_agree() {
    let _g = shared();
    let mut caps = blank_capabilities();
    // SAFETY: a writable struct.
    let (code, e) = failing(|err| unsafe { cc_query_capabilities(&mut caps, err) });
    let host = cc::host_info();
    assert_eq!(cc_supports_hypervisor(), host.hypervisor_available());
    if code != CC_OK {
        // Only when no instance can start here, saying why.
        assert_eq!(code, CC_ERR_HYPERVISOR_UNAVAILABLE);
        assert!(!cc_supports_hypervisor());
        assert_eq!(Some(e.message), host.unavailable());
        return;
    }
    assert!(cc_supports_hypervisor() && caps.hypervisor_available);
    assert_eq!(caps.size, std::mem::size_of::<cc_capabilities>());
    assert_eq!(text(caps.architecture).unwrap(), std::env::consts::ARCH);
    // The confinement the core reports, field for field.
    let host = cc::host_confinement();
    assert_eq!(caps.confined_seccomp, host.seccomp);
    assert_eq!(caps.confined_namespaces, host.namespaces);
    assert_eq!(caps.sandbox_uid, host.uid);
    assert_eq!(text(caps.confinement_gaps).unwrap(), host.gaps.join("; "));
    let accel = text(caps.accelerator).unwrap();
    assert!(accel == "kvm" || accel == "tcg", "{accel}");
    assert_eq!(caps.hardware_accelerated, accel == "kvm");
    let kernel = cc::host_info().kernel.ok().and_then(|k| k.hash);
    assert_eq!(text(caps.kernel_hash).unwrap(), kernel.unwrap_or_default());
}

#[test]
fn capabilities_need_their_size() {
    let _g = shared();
    for size in [0, 1, std::mem::size_of::<cc_capabilities>() - 1] {
        let mut caps = cc_capabilities {
            size,
            ..blank_capabilities()
        };
        // SAFETY: a writable struct, larger than it claims.
        let (code, e) = failing(|err| unsafe { cc_query_capabilities(&mut caps, err) });
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT, "{size}: {e:?}");
        assert!(e.message.contains("`out->size`"), "{}", e.message);
        assert!(caps.architecture.is_null(), "nothing written");
    }
}

#[test]
fn a_cc_error_gets_only_the_fields_within_its_size() {
    let _g = shared();
    let failure = || {
        Err(Failure {
            code: CC_ERR_IO,
            message: "read_file /x: gone".into(),
            op: Some("read_file".into()),
            path: Some("/x".into()),
            os_errno: libc::ENOENT,
        })
    };
    let marker = |size| cc_error {
        size,
        code: CC_ERR_TIMEOUT,
        os_errno: -7,
        ..cc_error::default()
    };
    // Too small for `code`: the call fails, nothing is written.
    let size = std::mem::offset_of!(cc_error, code) + 3;
    let mut err = marker(size);
    assert_eq!(guard(&mut err, failure), CC_ERR_IO);
    assert_eq!((err.code, err.os_errno), (CC_ERR_TIMEOUT, -7));
    assert!(err.message.is_null() && err.op.is_null() && err.path.is_null());
    // SAFETY: only the fields within `size` are touched: none.
    unsafe { cc_error_free(&mut err) };
    assert_eq!(
        (err.size, err.code, err.os_errno),
        (size, CC_ERR_TIMEOUT, -7)
    );
    // Size 0, a struct zeroed with `{0}`: the first version, every field.
    let mut err = marker(0);
    assert_eq!(guard(&mut err, failure), CC_ERR_IO);
    assert_eq!(
        (err.size, err.code, err.os_errno),
        (0, CC_ERR_IO, libc::ENOENT)
    );
    assert_eq!(text(err.op).as_deref(), Some("read_file"));
    // SAFETY: filled by the library as the first version.
    unsafe { cc_error_free(&mut err) };
    assert!(err.message.is_null() && err.op.is_null() && err.path.is_null());
    assert_eq!((err.size, err.code, err.os_errno), (0, CC_OK, 0));
    // Up to `message` only: the code, no strings allocated.
    let mut err = marker(std::mem::offset_of!(cc_error, message) + 7);
    assert_eq!(guard(&mut err, failure), CC_ERR_IO);
    assert_eq!(err.code, CC_ERR_IO);
    assert!(err.message.is_null() && err.op.is_null() && err.path.is_null());
    // An older caller's struct, without `os_errno`: everything else.
    let older = std::mem::offset_of!(cc_error, os_errno);
    let mut err = marker(older);
    assert_eq!(guard(&mut err, failure), CC_ERR_IO);
    assert_eq!((err.code, err.os_errno), (CC_ERR_IO, -7));
    assert_eq!(text(err.path).as_deref(), Some("/x"));
    // SAFETY: filled by the library within its size.
    unsafe { cc_error_free(&mut err) };
    assert!(err.message.is_null() && err.path.is_null());
    assert_eq!((err.size, err.code, err.os_errno), (older, CC_OK, -7));
    // The whole struct: `os_errno` too, and `size` kept.
    let (code, e) = failing(|err| guard(err, failure));
    assert_eq!((code, e.os_errno), (CC_ERR_IO, libc::ENOENT));
}

/// Two versions of a struct that grows, as a caller built against the
/// older header and this library see it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct V1 {
    size: usize,
    a: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
struct V2 {
    size: usize,
    a: u32,
    b: u64,
}

#[test]
fn sized_structs_are_read_and_written_within_the_callers_size() {
    use crate::ffi::{read_sized, SizedOut};
    let v1 = std::mem::size_of::<V1>();
    let older = V1 { size: v1, a: 5 };
    // SAFETY: each pointer is valid for the size its struct declares.
    unsafe {
        // An older caller's input: its fields read, the new one defaulted.
        let read = read_sized(ptr::addr_of!(older).cast::<V2>(), v1, "o").unwrap();
        assert_eq!(
            read,
            Some(V2 {
                size: v1,
                a: 5,
                b: 0
            })
        );
        assert_eq!(read_sized::<V2>(ptr::null(), v1, "o").unwrap(), None);
        // Below the first version: refused, whatever follows.
        for size in [0, v1 - 1] {
            let short = V1 { size, a: 5 };
            let e = read_sized(ptr::addr_of!(short).cast::<V2>(), v1, "o").unwrap_err();
            assert_eq!(e.code, CC_ERR_INVALID_ARGUMENT);
            assert!(e.message.contains("`o->size`"), "{}", e.message);
        }
        // A newer caller's input: unknown fields must be zero.
        let newer = V2 {
            size: std::mem::size_of::<V2>(),
            a: 5,
            b: 0,
        };
        let read = read_sized(ptr::addr_of!(newer).cast::<V1>(), v1, "o").unwrap();
        assert_eq!(read.map(|r| r.a), Some(5));
        let set = V2 { b: 1, ..newer };
        let e = read_sized(ptr::addr_of!(set).cast::<V1>(), v1, "o").unwrap_err();
        assert!(e.message.contains("does not know"), "{}", e.message);

        // Output to an older caller: its fields only, never its `size`,
        // nothing past it (`guard` stands for the memory after).
        let mut buf = (V1 { size: v1, a: 0 }, u64::MAX);
        let out = SizedOut::new(ptr::addr_of_mut!(buf.0).cast::<V2>(), v1, "out").unwrap();
        out.write(V2 {
            size: 999,
            a: 9,
            b: 3,
        });
        assert_eq!((buf.0.size, buf.0.a, buf.1), (v1, 9, u64::MAX));
        let mut short = V1 { size: 3, a: 0 };
        let e = SizedOut::new(ptr::addr_of_mut!(short).cast::<V2>(), v1, "out").unwrap_err();
        assert_eq!(e.code, CC_ERR_INVALID_ARGUMENT);
        assert_eq!(short.a, 0);
    }
}

#[test]
fn instance_options_need_their_size() {
    let _g = shared();
    let mut source = 0;
    // SAFETY: a literal path and a writable slot.
    let code =
        unsafe { cc_source_from_dir(c"/nonexistent".as_ptr(), &mut source, ptr::null_mut()) };
    assert_eq!(code, CC_OK);
    let full = cc_instance_options {
        size: std::mem::size_of::<cc_instance_options>(),
        ..Default::default()
    };
    for size in [0, 8, full.size - 1] {
        let opts = cc_instance_options { size, ..full };
        // SAFETY: valid options (smaller than they are).
        let (code, e) = failing(|err| unsafe { cc_instance_new(source, &opts, &mut 0, err) });
        assert_eq!(code, CC_ERR_INVALID_ARGUMENT, "{size}: {e:?}");
        assert!(e.message.contains("`options->size`"), "{}", e.message);
    }
    // A newer caller's larger struct: fine while what it adds is zero.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Newer {
        opts: cc_instance_options,
        added: u64,
    }
    let newer = |added| Newer {
        opts: cc_instance_options {
            size: std::mem::size_of::<Newer>(),
            ..full
        },
        added,
    };
    for (added, known) in [(0, true), (1, false)] {
        let opts = newer(added);
        // SAFETY: options valid for their declared size.
        let (code, e) = failing(|err| unsafe {
            cc_instance_new(source, ptr::addr_of!(opts).cast(), &mut 0, err)
        });
        if known {
            // Past the options to the missing root directory.
            assert_ne!(code, CC_ERR_INVALID_ARGUMENT, "{e:?}");
        } else {
            assert_eq!(code, CC_ERR_INVALID_ARGUMENT, "{e:?}");
        }
    }
    assert_eq!(cc_source_free(source), CC_OK);
}

extern "C" fn never_called(_: *const cc_pull_progress, _: *mut c_void) -> i32 {
    unreachable!()
}

#[test]
fn shutdown_releases_everything_and_blocks_calls_until_init() {
    let _g = exclusive();
    // SAFETY: valid slots and strings throughout.
    unsafe {
        assert_eq!(cc_init(ptr::null_mut()), CC_OK);
        assert_eq!(cc_init(ptr::null_mut()), CC_OK, "init twice is fine");
        let mut token = 0;
        assert_eq!(cc_cancel_token_new(&mut token, ptr::null_mut()), CC_OK);
        let mut source = 0;
        assert_eq!(
            cc_source_from_dir(c"/x".as_ptr(), &mut source, ptr::null_mut()),
            CC_OK
        );
        let dir = std::env::temp_dir().join(format!("cc-capi-shutdown-{}", std::process::id()));
        let dir_c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        let mut client = 0;
        assert_eq!(
            cc_oci_client_new(dir_c.as_ptr(), &mut client, ptr::null_mut()),
            CC_OK
        );
        assert!(crate::handles::len() >= 3);

        assert_eq!(cc_shutdown(ptr::null_mut()), CC_OK);
        assert_eq!(crate::handles::len(), 0, "every object released");
        assert_eq!(
            cc_shutdown(ptr::null_mut()),
            CC_OK,
            "shutting down twice is fine"
        );

        // Calls fail with a clear error...
        let not_init = |(code, e): (cc_error_code, Error)| {
            assert_eq!(code, CC_ERR_INVALID_ARGUMENT);
            assert_eq!(e.message, "library not initialized: call cc_init");
        };
        not_init(failing(|err| cc_cancel_token_new(&mut 0, err)));
        not_init(failing(|err| cc_cancel_token_cancel(token, err)));
        not_init(failing(|err| {
            cc_source_from_dir(c"/x".as_ptr(), &mut 0, err)
        }));
        not_init(failing(|err| {
            cc_query_capabilities(&mut std::mem::zeroed(), err)
        }));
        not_init(failing(|err| {
            cc_oci_pull(
                client,
                c"x".as_ptr(),
                ptr::null(),
                Some(never_called),
                ptr::null_mut(),
                0,
                &mut 0,
                err,
            )
        }));
        not_init(failing(|err| cc_instance_close(1, err)));
        not_init(failing(|err| cc_cmd_start(1, err)));
        not_init(failing(|err| cc_snapshot_close(1, err)));
        not_init(failing(|err| cc_file_sync(1, err)));
        // ... except versions and frees.
        assert!(cc_api_version_compatible(0, 1));
        assert_eq!(cc_cancel_token_free(token), CC_OK);
        assert_eq!(cc_source_free(source), CC_OK);
        assert_eq!(cc_oci_client_free(client), CC_OK);
        cc_string_free(ptr::null_mut());

        // After init again, old handles are gone for good but freeing them
        // stays harmless; new handles never repeat old ones.
        assert_eq!(cc_init(ptr::null_mut()), CC_OK);
        let mut cancelled = false;
        let (code, _) = failing(|err| cc_cancel_token_is_cancelled(token, &mut cancelled, err));
        assert_eq!(code, CC_ERR_INVALID_HANDLE);
        assert_eq!(cc_cancel_token_free(token), CC_OK);
        let mut fresh = 0;
        assert_eq!(cc_cancel_token_new(&mut fresh, ptr::null_mut()), CC_OK);
        assert!(fresh > client.max(source).max(token));
        assert_eq!(cc_cancel_token_free(fresh), CC_OK);
        assert_eq!(cc_cancel_token_free(fresh), CC_ERR_INVALID_HANDLE);
        let _ = std::fs::remove_dir_all(dir);
    }
}
