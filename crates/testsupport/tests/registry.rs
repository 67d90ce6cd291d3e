//! The registry harness against the real tools: `docker-registry`, `skopeo`,
//! `htpasswd` and the test images. These need the system packages that
//! `scripts/setup.sh` installs and fail (never skip) without them.

use std::path::Path;

use cc_testsupport::{test_images, Auth, Registry};

/// The digests (`sha256:` + 64 hex) in TEXT, in order.
fn digests_in(text: &str) -> Vec<String> {
    text.match_indices("sha256:")
        .map(|(i, _)| text[i..].chars().take(71).collect::<String>())
        .filter(|d| is_digest(d))
        .collect()
}

fn is_digest(d: &str) -> bool {
    d.len() == 71
        && d.starts_with("sha256:")
        && d[7..]
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// The digest index.json of LAYOUT names (our layouts name one).
fn layout_digest(layout: &Path) -> String {
    let index = std::fs::read_to_string(layout.join("index.json")).unwrap();
    digests_in(&index)
        .into_iter()
        .next()
        .expect("a digest in index.json")
}

#[test]
fn anonymous_registry_takes_images_and_indexes() {
    let images = test_images();
    let registry = Registry::start(Auth::Anonymous);
    assert!(
        registry.addr().starts_with("127.0.0.1:"),
        "{}",
        registry.addr()
    );

    registry.push(&images.busybox, "latest", "test/busybox:latest");
    let digest = registry.digest("test/busybox:latest");
    assert!(is_digest(&digest), "{digest}");
    assert_eq!(
        digest,
        layout_digest(&images.busybox),
        "digests are preserved"
    );

    registry.push(&images.multiarch, "latest", "test/multiarch:v1");
    let digest = registry.digest("test/multiarch:v1");
    assert!(is_digest(&digest), "{digest}");
    assert_eq!(digest, layout_digest(&images.multiarch));
    // The whole index went: both platforms' manifests are there, by digest.
    let index = registry
        .request(
            "GET",
            &format!("/v2/test/multiarch/manifests/{digest}"),
            &[("Accept", "application/vnd.oci.image.index.v1+json")],
            false,
        )
        .unwrap();
    assert_eq!(index.status, 200, "{index:?}");
    let text = index.text();
    assert!(
        text.contains("\"arm64\"") && text.contains("\"amd64\""),
        "{text}"
    );
    let manifests = digests_in(&text);
    assert_eq!(manifests.len(), 2, "{text}");
    for m in manifests {
        assert_eq!(registry.digest(&format!("test/multiarch@{m}")), m);
    }
}

#[test]
fn htpasswd_registry_wants_credentials() {
    let images = test_images();
    let registry = Registry::start(Auth::htpasswd("alice", "s3cret"));

    let anonymous = registry.request("GET", "/v2/", &[], false).unwrap();
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let challenge = anonymous.header("WWW-Authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    let authenticated = registry.request("GET", "/v2/", &[], true).unwrap();
    assert_eq!(authenticated.status, 200, "{authenticated:?}");
    let wrong = format!("Basic {}", "YWxpY2U6d3Jvbmc="); // alice:wrong
    let rejected = registry
        .request("GET", "/v2/", &[("Authorization", &wrong)], false)
        .unwrap();
    assert_eq!(rejected.status, 401, "{rejected:?}");

    registry.push(&images.busybox, "latest", "busybox:latest");
    let digest = registry.digest("busybox:latest");
    assert!(is_digest(&digest), "{digest}");
    assert_eq!(digest, layout_digest(&images.busybox));

    // zstd and uncompressed layers go through unchanged too.
    registry.push(&images.busybox_layers, "latest", "layers:latest");
    assert_eq!(
        registry.digest("layers:latest"),
        layout_digest(&images.busybox_layers)
    );
    registry.push(&images.multiarch, "latest", "multiarch:latest");
    assert_eq!(
        registry.digest("multiarch"),
        layout_digest(&images.multiarch)
    );

    let anonymous_pull = registry
        .request("HEAD", "/v2/busybox/manifests/latest", &[], false)
        .unwrap();
    assert_eq!(anonymous_pull.status, 401, "{anonymous_pull:?}");
}

/// GET URL (`http://host:port/path`) with Basic CREDENTIALS: status, body.
fn get(url: &str, credentials: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut req = format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n");
    if let Some(c) = credentials {
        let encoded = match c {
            "alice:s3cret" => "YWxpY2U6czNjcmV0",
            "alice:wrong" => "YWxpY2U6d3Jvbmc=",
            other => panic!("no encoding for {other}"),
        };
        req.push_str(&format!("Authorization: Basic {encoded}\r\n"));
    }
    req.push_str("\r\n");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

#[test]
fn token_registry_issues_and_demands_bearer_tokens() {
    let images = test_images();
    let registry = Registry::start(Auth::token("alice", "s3cret"));
    let realm = registry.token_realm().unwrap();

    let anonymous = registry.request("GET", "/v2/", &[], false).unwrap();
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    let challenge = anonymous.header("WWW-Authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with(&format!("Bearer realm=\"{realm}\"")),
        "{challenge}"
    );
    assert!(
        challenge.contains("service=\"cc-testsupport\""),
        "{challenge}"
    );

    // Basic credentials are for the token server, not the registry.
    let basic = format!("Basic {}", "YWxpY2U6czNjcmV0"); // alice:s3cret
    let rejected = registry
        .request("GET", "/v2/", &[("Authorization", &basic)], false)
        .unwrap();
    assert_eq!(rejected.status, 401, "{rejected:?}");

    let scope = "scope=repository%3Abusybox%3Apull&service=cc-testsupport";
    assert_eq!(get(&format!("{realm}?{scope}"), None).0, 401);
    assert_eq!(get(&format!("{realm}?{scope}"), Some("alice:wrong")).0, 401);
    let (status, body) = get(&format!("{realm}?{scope}"), Some("alice:s3cret"));
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let bearer = format!("Bearer {}", token["token"].as_str().unwrap());
    let accepted = registry
        .request("GET", "/v2/", &[("Authorization", &bearer)], false)
        .unwrap();
    assert_eq!(accepted.status, 200, "{accepted:?}\n{}", registry.log());

    // skopeo goes through the token flow to push.
    registry.push(&images.busybox, "latest", "busybox:latest");
    assert_eq!(
        registry.digest("busybox:latest"),
        layout_digest(&images.busybox)
    );
    let head = |path: &str| {
        registry
            .request(
                "HEAD",
                path,
                &[
                    ("Authorization", &bearer),
                    ("Accept", "application/vnd.oci.image.manifest.v1+json"),
                ],
                false,
            )
            .unwrap()
            .status
    };
    assert_eq!(head("/v2/busybox/manifests/latest"), 200);
    // The token for one repository does not open another.
    assert_eq!(head("/v2/other/manifests/latest"), 401);
}

#[test]
fn dropping_the_registry_stops_it_and_cleans_up() {
    let registry = Registry::start(Auth::Anonymous);
    let dir = registry.dir().to_path_buf();
    let pid = registry.pid();
    let addr = registry.addr();
    assert!(dir.join("config.yml").exists());
    assert!(
        registry.log().contains("listening on"),
        "{}",
        registry.log()
    );
    drop(registry);
    assert!(!dir.exists(), "{} is left", dir.display());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "registry {pid} still runs"
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "{addr} still answers"
    );
}

#[test]
fn registries_run_side_by_side() {
    let a = Registry::start(Auth::Anonymous);
    let b = Registry::start(Auth::htpasswd("bob", "pw:with:colons"));
    assert_ne!(a.addr(), b.addr());
    assert_eq!(b.request("GET", "/v2/", &[], true).unwrap().status, 200);
}

#[test]
fn test_images_are_layouts_and_archives() {
    let images = test_images();
    for layout in [&images.busybox, &images.busybox_layers, &images.multiarch] {
        assert!(layout.join("oci-layout").is_file(), "{}", layout.display());
        assert!(layout.join("index.json").is_file(), "{}", layout.display());
        assert!(is_digest(&layout_digest(layout)));
    }
    for archive in [&images.busybox_docker_tar, &images.busybox_oci_tar] {
        let len = std::fs::metadata(archive).unwrap().len();
        assert!(len > 100_000, "{} is {len} bytes", archive.display());
    }
    assert_eq!(test_images(), images, "built once per process");
}
