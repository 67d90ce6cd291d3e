//! Files: whole-file transfers with their streams, and `Fs` requests on
//! paths and handles, with the guest's errno carried back.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use cc_protocol::{
    open_flags, ErrorKind, FsRequest, Message, Request, Response, UnixTime, STREAM_WINDOW,
};

use crate::common::{bytes, read_all, stream_id, Host, Scratch};

/// The umask of the test process's main thread, from the kernel.
fn process_umask() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    line.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn a_written_file_gets_its_contents_and_exactly_its_mode() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    let umask = process_umask();
    let stream = stream_id();
    let id = host.begin(Request::WriteFile {
        path: scratch.path("f"),
        mode: 0o666,
        stream,
    });
    host.write_stream(stream, b"contents");
    assert_eq!(host.answer(id), Ok(Response::Done));
    assert_eq!(std::fs::read(scratch.join("f")).unwrap(), b"contents");
    let mode = std::fs::metadata(scratch.join("f")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o666);
    // Exact modes without touching the process's umask.
    assert_eq!(process_umask(), umask);
}

#[test]
fn a_file_is_read_with_its_size_first() {
    let scratch = Scratch::new();
    let contents: Vec<u8> = (0..3 * STREAM_WINDOW).map(|i| i as u8).collect();
    std::fs::write(scratch.join("big"), &contents).unwrap();
    let mut host = Host::new();
    let stream = stream_id();
    let read = Request::ReadFile {
        path: scratch.path("big"),
        stream,
    };
    assert_eq!(
        host.request(read),
        Ok(Response::Size(contents.len() as u64))
    );
    assert_eq!(host.read_stream(stream), contents);
}

#[test]
fn a_handle_streams_as_many_bytes_as_asked_from_its_offset() {
    let scratch = Scratch::new();
    let contents: Vec<u8> = (0..3 * STREAM_WINDOW).map(|i| (i / 7) as u8).collect();
    std::fs::write(scratch.join("big"), &contents).unwrap();
    let mut host = Host::new();
    let open = FsRequest::Open {
        handle: 3,
        path: scratch.path("big"),
        flags: cc_protocol::open_flags::O_RDONLY,
        mode: 0,
    };
    assert!(host.fs(open).is_ok());
    let mut at = 0;
    for len in [10, 2 * STREAM_WINDOW as usize + 5, contents.len()] {
        let stream = stream_id();
        let read = Request::ReadHandle {
            handle: 3,
            len: len as u64,
            stream,
        };
        assert_eq!(host.request(read), Ok(Response::Done));
        let end = (at + len).min(contents.len());
        assert_eq!(host.read_stream(stream), &contents[at..end]);
        at = end;
    }
    // An unknown handle fails before any stream.
    let read = Request::ReadHandle {
        handle: 4,
        len: 1,
        stream: stream_id(),
    };
    assert!(host.request(read).is_err());
}

#[test]
fn reading_a_missing_file_fails_with_its_errno_and_no_stream() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    let stream = stream_id();
    let err = host
        .request(Request::ReadFile {
            path: scratch.path("missing"),
            stream,
        })
        .unwrap_err();
    assert_eq!(
        (err.kind, err.errno),
        (ErrorKind::NotFound, Some(libc::ENOENT))
    );
    let shown = scratch.join("missing");
    assert_eq!(
        err.message,
        format!("open {}: No such file or directory", shown.display())
    );
    assert!(!host.arrives(Duration::from_millis(100), |m| {
        matches!(m, Message::Data { stream: s, .. } | Message::Eof { stream: s } if *s == stream)
    }));
}

#[test]
fn only_regular_files_are_read_whole() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    let err = host
        .request(Request::ReadFile {
            path: scratch.path(""),
            stream: stream_id(),
        })
        .unwrap_err();
    assert_eq!(err.errno, Some(libc::EISDIR));
    let err = host
        .request(Request::ReadFile {
            path: bytes("/dev/null"),
            stream: stream_id(),
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    let err = host
        .request(Request::ReadFile {
            path: bytes("relative"),
            stream: stream_id(),
        })
        .unwrap_err();
    assert_eq!(err.message, "open relative: not an absolute path");
}

#[test]
fn a_write_that_cannot_open_its_file_resets_the_stream() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    let stream = stream_id();
    let err = host
        .request(Request::WriteFile {
            path: scratch.path("missing/f"),
            mode: 0o644,
            stream,
        })
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    host.expect(
        "the reset",
        |m| matches!(m, Message::Reset { stream: s } if *s == stream),
    );
}

#[test]
fn a_write_the_host_aborts_fails() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    let stream = stream_id();
    let id = host.begin(Request::WriteFile {
        path: scratch.path("f"),
        mode: 0o644,
        stream,
    });
    host.send(&Message::Data {
        stream,
        bytes: bytes("part"),
    });
    host.send(&Message::Reset { stream });
    let err = host.answer(id).unwrap_err();
    assert_eq!(
        err.message,
        format!(
            "write {}: the transfer was aborted",
            scratch.join("f").display()
        )
    );
}

#[test]
fn directories_are_made_listed_and_removed() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    let mkdir = FsRequest::Mkdir {
        path: scratch.path("a/b/c"),
        mode: 0o750,
        all: true,
    };
    assert_eq!(host.fs(mkdir), Ok(Response::Done));
    let mode = std::fs::metadata(scratch.join("a/b")).unwrap().mode();
    assert_eq!(mode & 0o7777, 0o750);
    std::fs::write(scratch.join("a/file"), b"").unwrap();
    std::os::unix::fs::symlink("b", scratch.join("a/link")).unwrap();
    let Ok(Response::Entries(entries)) = host.fs(FsRequest::ReadDir {
        path: scratch.path("a"),
    }) else {
        panic!("no entries")
    };
    let names: Vec<_> = entries.iter().map(|e| e.name.to_vec()).collect();
    assert_eq!(names, [b"b".to_vec(), b"file".to_vec(), b"link".to_vec()]);
    assert_eq!(entries[2].mode & libc::S_IFMT, libc::S_IFLNK);
    let err = host
        .fs(FsRequest::Remove {
            path: scratch.path("a"),
            all: false,
        })
        .unwrap_err();
    assert_eq!(err.errno, Some(libc::ENOTEMPTY));
    let remove_all = FsRequest::Remove {
        path: scratch.path("a"),
        all: true,
    };
    assert_eq!(host.fs(remove_all), Ok(Response::Done));
    assert!(!scratch.join("a").exists());
}

#[test]
fn paths_are_stated_linked_renamed_and_changed() {
    let scratch = Scratch::new();
    let mut host = Host::new();
    std::fs::write(scratch.join("f"), b"12345").unwrap();
    let Ok(Response::Stat(st)) = host.fs(FsRequest::Stat {
        path: scratch.path("f"),
        follow: true,
    }) else {
        panic!("no stat")
    };
    assert_eq!(st.size, 5);
    assert_eq!(st.mode & libc::S_IFMT, libc::S_IFREG);
    let symlink = FsRequest::Symlink {
        target: bytes("f"),
        link: scratch.path("l"),
    };
    assert_eq!(host.fs(symlink), Ok(Response::Done));
    let readlink = FsRequest::Readlink {
        path: scratch.path("l"),
    };
    assert_eq!(host.fs(readlink), Ok(Response::Link(bytes("f"))));
    let chmod = FsRequest::Chmod {
        path: scratch.path("f"),
        mode: 0o600,
    };
    assert_eq!(host.fs(chmod), Ok(Response::Done));
    let time = UnixTime {
        secs: 1_000_000_000,
        nanos: 5,
    };
    let chtimes = FsRequest::Chtimes {
        path: scratch.path("f"),
        atime: time,
        mtime: time,
    };
    assert_eq!(host.fs(chtimes), Ok(Response::Done));
    let rename = FsRequest::Rename {
        from: scratch.path("f"),
        to: scratch.path("g"),
    };
    assert_eq!(host.fs(rename), Ok(Response::Done));
    let meta = std::fs::metadata(scratch.join("g")).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o600, 1_000_000_000));
    let err = host
        .fs(FsRequest::Stat {
            path: scratch.path("l"),
            follow: true,
        })
        .unwrap_err();
    assert_eq!(
        (err.kind, err.errno),
        (ErrorKind::NotFound, Some(libc::ENOENT))
    );
    let lstat = FsRequest::Stat {
        path: scratch.path("l"),
        follow: false,
    };
    assert!(matches!(host.fs(lstat), Ok(Response::Stat(_))));
}

#[test]
fn files_are_opened_read_written_and_closed_by_handle() {
    use open_flags as o;
    let scratch = Scratch::new();
    let mut host = Host::new();
    let open = FsRequest::Open {
        handle: 7,
        path: scratch.path("h"),
        flags: o::O_RDWR | o::O_CREATE | o::O_EXCL,
        mode: 0o640,
    };
    let Ok(Response::Stat(st)) = host.fs(open) else {
        panic!("not opened")
    };
    assert_eq!(st.mode, libc::S_IFREG | 0o640);
    let stream = stream_id();
    let id = host.begin(Request::WriteHandle { handle: 7, stream });
    host.write_stream(stream, b"hello world");
    assert_eq!(host.answer(id), Ok(Response::Done));
    let seek = FsRequest::Seek {
        handle: 7,
        offset: 6,
        whence: 0,
    };
    assert_eq!(host.fs(seek), Ok(Response::Offset(6)));
    let stream = stream_id();
    let read = Request::ReadHandle {
        handle: 7,
        len: 64,
        stream,
    };
    assert_eq!(host.request(read), Ok(Response::Done));
    assert_eq!(host.read_stream(stream), b"world");
    assert_eq!(
        host.fs(FsRequest::Truncate { handle: 7, len: 5 }),
        Ok(Response::Done)
    );
    assert_eq!(host.fs(FsRequest::Sync { handle: 7 }), Ok(Response::Done));
    let Ok(Response::Stat(st)) = host.fs(FsRequest::Fstat { handle: 7 }) else {
        panic!("no stat")
    };
    assert_eq!(st.size, 5);
    assert_eq!(host.fs(FsRequest::Close { handle: 7 }), Ok(Response::Done));
    let err = host.fs(FsRequest::Close { handle: 7 }).unwrap_err();
    assert_eq!(
        (err.kind, err.errno),
        (ErrorKind::InvalidArgument, Some(libc::EBADF))
    );
    assert_eq!(
        read_all(std::fs::File::open(scratch.join("h")).unwrap()),
        b"hello"
    );
    let mode = std::fs::metadata(scratch.join("h"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
}

#[test]
fn errors_on_files_carry_the_errno() {
    use open_flags as o;
    let scratch = Scratch::new();
    let mut host = Host::new();
    std::fs::write(scratch.join("exists"), b"").unwrap();
    let err = host
        .fs(FsRequest::Open {
            handle: 1,
            path: scratch.path("exists"),
            flags: o::O_WRONLY | o::O_CREATE | o::O_EXCL,
            mode: 0o600,
        })
        .unwrap_err();
    assert_eq!((err.kind, err.errno), (ErrorKind::Io, Some(libc::EEXIST)));
    let err = host
        .fs(FsRequest::Mkdir {
            path: scratch.path("exists/sub"),
            mode: 0o755,
            all: false,
        })
        .unwrap_err();
    assert_eq!(err.errno, Some(libc::ENOTDIR));
    let err = host
        .fs(FsRequest::Readlink {
            path: scratch.path("exists"),
        })
        .unwrap_err();
    assert_eq!(err.errno, Some(libc::EINVAL));
}

#[test]
fn a_transfer_stream_reset_by_the_host_stops_a_read() {
    let scratch = Scratch::new();
    let contents = vec![1u8; 3 * STREAM_WINDOW as usize];
    std::fs::write(scratch.join("big"), &contents).unwrap();
    let mut host = Host::new();
    let stream = stream_id();
    let read = Request::ReadFile {
        path: scratch.path("big"),
        stream,
    };
    assert!(matches!(host.request(read), Ok(Response::Size(_))));
    host.send(&Message::Reset { stream });
    // The agent stops: no more than the window, and no end of file.
    let on_stream = |m: &Message| matches!(m, Message::Data { stream: s, .. } | Message::Eof { stream: s } if *s == stream);
    let mut got = 0;
    while host.arrives(Duration::from_millis(300), on_stream) {
        match host.expect("data", on_stream) {
            Message::Data { bytes, .. } => got += bytes.len(),
            other => panic!("{other:?} after a reset"),
        }
    }
    assert!(got <= STREAM_WINDOW as usize);
    // The stream id is free again.
    std::fs::write(scratch.join("small"), b"ok").unwrap();
    let again = Request::ReadFile {
        path: scratch.path("small"),
        stream,
    };
    assert_eq!(host.request(again), Ok(Response::Size(2)));
    assert_eq!(host.read_stream(stream), b"ok");
}
