//! `SnapshotUpper` in host mode: the directory the host program gives
//! stands in for the overlay's writable layer, streamed as a tarball with
//! the exclude rules applied.

use cc_agent::{Agent, Mode};
use cc_protocol::{ErrorKind, Request, Response};

use crate::common::{stream_id, Host, Scratch};

/// The paths in a tarball, in order.
fn paths(tarball: &[u8]) -> Vec<String> {
    tar::Archive::new(tarball)
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn layer() -> Scratch {
    let upper = Scratch::new();
    for dir in ["etc", "var/log", "cache/pip", "home/u/cache"] {
        std::fs::create_dir_all(upper.join(dir)).unwrap();
    }
    for file in [
        "etc/hostname",
        "var/log/app.log",
        "var/log/keep.txt",
        "cache/pip/x",
        "home/u/cache/y",
        "top.log",
    ] {
        std::fs::write(upper.join(file), file).unwrap();
    }
    upper
}

fn snapshot(host: &mut Host, exclude: &[&str]) -> Result<Vec<u8>, cc_protocol::RemoteError> {
    let stream = stream_id();
    let request = Request::SnapshotUpper {
        stream,
        exclude: exclude.iter().map(|p| p.to_string()).collect(),
    };
    assert_eq!(host.request(request)?, Response::Done);
    Ok(host.read_stream(stream))
}

#[test]
fn the_upper_directory_streams_as_a_sorted_tarball() {
    let upper = layer();
    let agent = Agent::new(Mode::Host).unwrap();
    agent.set_upper(&upper.0).unwrap();
    let mut host = Host::connect(agent);
    let tarball = snapshot(&mut host, &[]).unwrap();
    assert_eq!(
        paths(&tarball),
        [
            "cache",
            "cache/pip",
            "cache/pip/x",
            "etc",
            "etc/hostname",
            "home",
            "home/u",
            "home/u/cache",
            "home/u/cache/y",
            "top.log",
            "var",
            "var/log",
            "var/log/app.log",
            "var/log/keep.txt",
        ]
    );
}

#[test]
fn excluded_paths_are_left_out_whole() {
    let upper = layer();
    let agent = Agent::new(Mode::Host).unwrap();
    agent.set_upper(&upper.0).unwrap();
    let mut host = Host::connect(agent);
    let tarball = snapshot(&mut host, &["*.log", "/cache", "/home/**/cache/*"]).unwrap();
    assert_eq!(
        paths(&tarball),
        [
            "etc",
            "etc/hostname",
            "home",
            "home/u",
            "home/u/cache",
            "var",
            "var/log",
            "var/log/keep.txt",
        ]
    );
}

#[test]
fn an_empty_exclude_pattern_is_refused() {
    let upper = layer();
    let agent = Agent::new(Mode::Host).unwrap();
    agent.set_upper(&upper.0).unwrap();
    let mut host = Host::connect(agent);
    let err = snapshot(&mut host, &["/tmp", " "]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidArgument);
    assert_eq!(err.message, "empty exclude pattern");
}

#[test]
fn without_an_upper_directory_there_is_no_writable_layer() {
    let mut host = Host::new();
    let err = snapshot(&mut host, &[]).unwrap_err();
    assert_eq!(err.message, "no writable layer");
}
