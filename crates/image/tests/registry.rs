//! The image store against a real registry (Distribution from Debian's
//! `docker-registry`, on loopback) and real layouts and archives. No VMs:
//! booting these images is covered by the core's VM tests.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use cc_image::{Auth, CancelToken, Client, Error, Progress, PullOptions, PullPolicy};
use cc_testsupport::{test_images, Auth as RegistryAuth, Registry};

fn store(name: &str) -> (Client, PathBuf) {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let root = std::env::temp_dir().join(format!(
        "cc-image-test-{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&root);
    (Client::open(&root).unwrap(), root)
}

fn pull(
    client: &Client,
    reference: &str,
    options: &PullOptions,
) -> Result<(cc_image::Image, Vec<Progress>), Error> {
    let mut events = Vec::new();
    let image = client.pull(
        reference,
        options,
        &mut |p| events.push(p.clone()),
        &CancelToken::new(),
    )?;
    Ok((image, events))
}

fn temp_files(root: &Path) -> usize {
    fs::read_dir(root.join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn pull_by_tag_and_digest_with_monotonic_progress() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.busybox_layers, "latest", "test/layers:v1");
    let (client, root) = store("tag");
    let reference = format!("{}/test/layers:v1", registry.addr());
    let (image, events) = pull(&client, &reference, &PullOptions::default()).unwrap();
    assert_eq!(image.name(), Some(reference.as_str()));
    assert_eq!(
        image.digest().to_string(),
        registry.digest("test/layers:v1")
    );
    assert_eq!(
        image.layers().unwrap().len(),
        3,
        "gzip, zstd and plain layers"
    );

    let last = events.last().expect("progress events");
    assert!(
        last.total > 0 && last.current == last.total,
        "ends at total: {last:?}"
    );
    assert!(
        events.windows(2).all(|w| w[0].current <= w[1].current),
        "monotonic"
    );
    assert_eq!(last.blob_count, 4, "config and three layers");
    assert!(events
        .iter()
        .all(|e| e.blob_index < e.blob_count && e.blob.starts_with("sha256:")));

    let config = image.config();
    assert_eq!(config.entrypoint, ["/bin/echo", "entry:"]);
    assert_eq!(config.user.as_deref(), Some("alice"));
    let rootfs = image.rootfs().unwrap();
    assert!(fs::metadata(&rootfs).unwrap().len() > 1 << 20);
    let again = image.rootfs().unwrap();
    assert_eq!(rootfs, again, "converted once per image");

    let by_digest = format!("{}/test/layers@{}", registry.addr(), image.digest());
    let (same, events) = pull(&client, &by_digest, &PullOptions::default()).unwrap();
    assert_eq!(same.digest(), image.digest());
    assert!(events.is_empty(), "nothing downloaded again: {events:?}");
    assert_eq!(temp_files(&root), 0);
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn multi_arch_index_selects_host_or_requested_platform() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.multiarch, "latest", "test/multi:latest");
    let (client, root) = store("multi");
    let reference = format!("{}/test/multi:latest", registry.addr());
    let (host, _) = pull(&client, &reference, &PullOptions::default()).unwrap();
    assert_eq!(host.config().architecture, "amd64");
    let arm = PullOptions {
        platform: Some("linux/arm64".parse().unwrap()),
        policy: PullPolicy::Always,
        ..Default::default()
    };
    let (arm, _) = pull(&client, &reference, &arm).unwrap();
    assert_eq!(arm.config().architecture, "arm64");
    let none = PullOptions {
        platform: Some("linux/s390x".parse().unwrap()),
        policy: PullPolicy::Always,
        ..Default::default()
    };
    let err = pull(&client, &reference, &none).unwrap_err();
    assert!(matches!(err, Error::NoPlatform { .. }), "{err}");
    assert!(err.to_string().contains("linux/arm64/v8"), "{err}");
    fs::remove_dir_all(root).unwrap();
}

/// A registry with AUTH holding `private/busybox:1`, its reference there,
/// and a fresh store named NAME.
fn private_registry(auth: RegistryAuth, name: &str) -> (Registry, String, Client, PathBuf) {
    let registry = Registry::start(auth);
    registry.push(&test_images().busybox, "latest", "private/busybox:1");
    let reference = format!("{}/private/busybox:1", registry.addr());
    let (client, root) = store(name);
    (registry, reference, client, root)
}

fn with_auth(user: &str, password: &str) -> PullOptions {
    PullOptions {
        auth: Some(Auth {
            username: user.into(),
            password: password.into(),
        }),
        ..Default::default()
    }
}

#[test]
fn authentication_success_and_failure() {
    let (registry, reference, client, root) =
        private_registry(RegistryAuth::htpasswd("tester", "s3cret"), "auth");

    let err = pull(&client, &reference, &PullOptions::default()).unwrap_err();
    assert!(err.is_network(), "anonymous: {err}");
    let wrong = with_auth("tester", "nope");
    assert!(pull(&client, &reference, &wrong).unwrap_err().is_network());
    assert_eq!(temp_files(&root), 0);

    pull(&client, &reference, &with_auth("tester", "s3cret")).unwrap();

    // Credentials from the docker client's config file.
    let config_dir = root.join("docker-config");
    fs::create_dir_all(&config_dir).unwrap();
    fs::write(
        config_dir.join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"dGVzdGVyOnMzY3JldA=="}}}}}}"#,
            registry.addr()
        ),
    )
    .unwrap();
    std::env::set_var("DOCKER_CONFIG", &config_dir);
    let (fresh, fresh_root) = store("auth-config");
    let result = pull(&fresh, &reference, &PullOptions::default());
    std::env::remove_var("DOCKER_CONFIG");
    result.unwrap();
    fs::remove_dir_all(root).unwrap();
    fs::remove_dir_all(fresh_root).unwrap();
}

#[test]
fn pull_policies() {
    let images = test_images();
    let (client, root) = store("policy");
    let reference;
    {
        let registry = Registry::start(RegistryAuth::Anonymous);
        registry.push(&images.busybox, "latest", "test/policy:1");
        reference = format!("{}/test/policy:1", registry.addr());
        let never = PullOptions {
            policy: PullPolicy::Never,
            ..Default::default()
        };
        let err = pull(&client, &reference, &never).unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err}");
        assert!(err.to_string().contains("NEVER"), "{err}");
        pull(&client, &reference, &PullOptions::default()).unwrap();
    }
    // The registry is gone: only the store can answer now.
    let (image, events) = pull(&client, &reference, &PullOptions::default()).unwrap();
    assert!(events.is_empty());
    let never = PullOptions {
        policy: PullPolicy::Never,
        ..Default::default()
    };
    assert_eq!(
        pull(&client, &reference, &never).unwrap().0.digest(),
        image.digest()
    );
    let always = PullOptions {
        policy: PullPolicy::Always,
        ..Default::default()
    };
    let err = pull(&client, &reference, &always).unwrap_err();
    assert!(err.is_network(), "{err}");
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn cancel_leaves_the_store_clean() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.busybox, "latest", "test/cancel:1");
    let (client, root) = store("cancel");
    let cancel = CancelToken::new();
    let reference = format!("{}/test/cancel:1", registry.addr());
    let mut calls = 0;
    let err = client
        .pull(
            &reference,
            &PullOptions::default(),
            &mut |p| {
                calls += 1;
                if p.current > 0 {
                    cancel.cancel();
                }
            },
            &cancel,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled("pull")), "{err}");
    assert_eq!(err.to_string(), "pull cancelled");
    assert!(calls > 0);
    assert_eq!(temp_files(&root), 0, "half-written blob left");
    assert!(client.images().unwrap().is_empty());
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn corrupt_blob_is_rejected_and_not_stored() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.busybox, "latest", "test/corrupt:1");
    // Flip a byte of the layer in the registry's own storage.
    let layer = find_largest_file(registry.dir());
    let mut bytes = fs::read(&layer).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&layer, bytes).unwrap();
    let (client, root) = store("corrupt");
    let err = pull(
        &client,
        &format!("{}/test/corrupt:1", registry.addr()),
        &PullOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::DigestMismatch { .. }) || err.is_network(),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("digest") || err.to_string().contains("Digest"),
        "{err}"
    );
    assert_eq!(temp_files(&root), 0);
    let layer_digest = layer
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        !root.join("blobs/sha256").join(layer_digest).exists(),
        "corrupt blob stored"
    );
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_layer_failing_its_digest_only_at_its_end_leaves_nothing() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.busybox, "latest", "test/late:1");
    // The gzip header's mtime: the layer still decompresses and unpacks
    // to the same tar, so only its digest, known at the end, is wrong.
    let layer = find_largest_file(registry.dir());
    let mut bytes = fs::read(&layer).unwrap();
    assert_eq!(bytes[..2], [0x1f, 0x8b], "a gzip layer");
    bytes[4] ^= 0xff;
    fs::write(&layer, bytes).unwrap();
    let (client, root) = store("late");
    let err = pull(
        &client,
        &format!("{}/test/late:1", registry.addr()),
        &PullOptions::default(),
    )
    .map(drop)
    .unwrap_err();
    // oci-client verifies the digest too, and may say so first.
    assert!(err.to_string().to_lowercase().contains("digest"), "{err:?}");
    assert_eq!(temp_files(&root), 0, "half-written file left");
    assert!(
        root.join("rootfs").read_dir().unwrap().next().is_none(),
        "root image published from an unverified layer"
    );
    assert!(client.images().unwrap().is_empty());
    let layer_digest = layer.parent().unwrap().file_name().unwrap();
    assert!(!root.join("blobs/sha256").join(layer_digest).exists());
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_pull_builds_the_root_image_as_it_downloads() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.busybox, "latest", "test/built:1");
    let (client, root) = store("built");
    let reference = format!("{}/test/built:1", registry.addr());
    let (image, _) = pull(&client, &reference, &PullOptions::default()).unwrap();
    let built: Vec<_> = root.join("rootfs").read_dir().unwrap().flatten().collect();
    assert_eq!(built.len(), 1, "one root image, built by the pull");
    assert_eq!(image.rootfs().unwrap(), built[0].path());
    // Built the same as from stored layers, the way loads build it.
    let streamed = fs::read(built[0].path()).unwrap();
    fs::remove_file(built[0].path()).unwrap();
    assert_eq!(fs::read(image.rootfs().unwrap()).unwrap(), streamed);
    assert_eq!(temp_files(&root), 0);
    fs::remove_dir_all(root).unwrap();
}

fn find_largest_file(dir: &Path) -> PathBuf {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if best.as_ref().is_none_or(|(size, _)| m.len() > *size) {
                best = Some((m.len(), e.path()));
            }
        }
    }
    best.unwrap().1
}

#[test]
fn a_cancelled_load_is_cancelled_and_stores_nothing() {
    let images = test_images();
    let (client, _root) = store("load-cancel");
    let cancel = CancelToken::new();
    cancel.cancel();
    for err in [
        client
            .load_dir_cancellable(&images.busybox, None, &cancel)
            .unwrap_err(),
        client
            .load_tar_cancellable(&images.busybox_oci_tar, None, &cancel)
            .unwrap_err(),
    ] {
        assert!(matches!(err, Error::Cancelled("load")), "{err}");
        assert_eq!(err.to_string(), "load cancelled");
    }
    assert!(client.images().unwrap().is_empty());
}

#[test]
fn load_both_archive_kinds_and_round_trip_through_export() {
    let images = test_images();
    let (client, root) = store("load");
    let from_dir = client.load_dir(&images.busybox, None).unwrap();
    let oci = client.load_tar(&images.busybox_oci_tar, None).unwrap();
    assert_eq!(oci.digest(), from_dir.digest(), "same image either way");
    let docker = client.load_tar(&images.busybox_docker_tar, None).unwrap();
    assert_eq!(docker.name(), Some("docker.io/library/busybox:latest"));
    assert_eq!(docker.config(), from_dir.config());
    let docker_root = docker.rootfs().unwrap();
    assert!(docker_root.is_file());

    let out = root.join("exported");
    client.export_dir(&docker, &out).unwrap();
    let err = client.export_dir(&docker, &out).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");
    let (other, other_root) = store("reload");
    let back = other.load_dir(&out, None).unwrap();
    assert_eq!(back.digest(), docker.digest());
    assert_eq!(back.name(), docker.name());
    // skopeo reads what we wrote.
    let inspect = std::process::Command::new("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:latest", out.display()))
        .output()
        .expect("skopeo (apt-get install skopeo)");
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert_eq!(cc_image::Digest::of(&inspect.stdout), *docker.digest());
    fs::remove_dir_all(root).unwrap();
    fs::remove_dir_all(other_root).unwrap();
}

#[test]
fn hostile_layouts_are_clear_errors_and_write_nothing() {
    let images = test_images();
    let (client, root) = store("hostile");
    let bad = root.join("bad-layout");
    fs::create_dir_all(&bad).unwrap();
    fs::write(bad.join("index.json"), b"not json").unwrap();
    assert!(matches!(
        client.load_dir(&bad, None).unwrap_err(),
        Error::BadDocument(_)
    ));
    // An index naming a blob the layout lacks.
    fs::write(
        bad.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":10}}]}}"#, "0".repeat(64)),
    )
    .unwrap();
    assert!(matches!(
        client.load_dir(&bad, None).unwrap_err(),
        Error::MissingBlob(_)
    ));
    // A digest that tries to walk out of blobs/.
    fs::write(
        bad.join("index.json"),
        r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:../../../etc/passwd","size":10}]}"#,
    )
    .unwrap();
    assert!(client.load_dir(&bad, None).is_err());
    // A layer blob whose bytes do not match its digest.
    let copy = root.join("tampered");
    copy_dir(&images.busybox, &copy);
    let layer = find_largest_file(&copy.join("blobs"));
    fs::write(&layer, b"garbage").unwrap();
    assert!(matches!(
        client.load_dir(&copy, None).unwrap_err(),
        Error::DigestMismatch { .. }
    ));
    assert_eq!(temp_files(&root), 0);
    assert!(client.images().unwrap().is_empty());
    fs::remove_dir_all(root).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn decompression_bombs_are_bounded() {
    let images = test_images();
    let (mut client, root) = store("bomb");
    let image = client.load_dir(&images.busybox, None).unwrap();
    client.set_unpack_limits(cc_image::UnpackLimits {
        max_layer_bytes: 1 << 20,
        ..Default::default()
    });
    let limited = client.image(&image.digest().to_string()).unwrap();
    let err = limited.rootfs().unwrap_err();
    assert!(err.to_string().contains("per-layer limit"), "{err}");
    assert!(
        !root.join("rootfs").read_dir().unwrap().any(|_| true),
        "no partial root image"
    );
    assert_eq!(temp_files(&root), 0);
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn images_listing_removal_and_prune() {
    let images = test_images();
    let (client, root) = store("prune");
    let a = client.load_dir(&images.busybox, None).unwrap();
    let b = client.load_dir(&images.busybox_layers, None).unwrap();
    a.rootfs().unwrap();
    b.rootfs().unwrap();
    let names: Vec<String> = client
        .images()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let before = client.usage().unwrap();
    assert_eq!(before.images, 2);
    assert_eq!(before.root_images.count, 2, "{before:?}");
    assert_eq!(
        before.content.reclaimable + before.root_images.reclaimable,
        0
    );
    assert!(client.remove(b.name().unwrap()).unwrap());
    let unnamed = client.usage().unwrap();
    assert_eq!(unnamed.images, 1);
    assert!(unnamed.root_images.reclaimable > 0, "{unnamed:?}");
    let stats = client.prune().unwrap();
    assert!(stats.blobs >= 3 && stats.root_images == 1, "{stats:?}");
    // Usage and prune agree on what was free.
    let after = client.usage().unwrap();
    assert_eq!(
        unnamed.content.reclaimable + unnamed.root_images.reclaimable,
        stats.bytes
    );
    assert_eq!(
        after.content.bytes + after.root_images.bytes + stats.bytes,
        unnamed.content.bytes + unnamed.root_images.bytes
    );
    assert_eq!(after.content.reclaimable + after.root_images.reclaimable, 0);
    // What a still-named image uses stays.
    assert!(client.image(a.name().unwrap()).unwrap().rootfs().is_ok());
    assert_eq!(client.prune().unwrap(), cc_image::PruneStats::default());
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn concurrent_pulls_of_one_image_into_one_store() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.busybox_layers, "latest", "test/race:1");
    let (_, root) = store("race");
    let reference = format!("{}/test/race:1", registry.addr());
    let digests: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (root, reference) = (root.clone(), reference.clone());
                s.spawn(move || {
                    // Separate clients, as separate processes would have.
                    let client = Client::open(&root).unwrap();
                    let (image, _) = pull(&client, &reference, &PullOptions::default()).unwrap();
                    image.rootfs().unwrap();
                    image.digest().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(digests.windows(2).all(|w| w[0] == w[1]));
    let client = Client::open(&root).unwrap();
    let image = client.image(&reference).unwrap();
    for layer in image.layers().unwrap() {
        let bytes = fs::read(client.store().blob_path(&layer)).unwrap();
        assert_eq!(cc_image::Digest::of(&bytes), layer, "stored blob intact");
    }
    assert_eq!(temp_files(&root), 0);
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn docker_schema2_images_pull_and_convert() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push_docker_v2(&images.busybox, "latest", "test/docker:v2");
    let (client, root) = store("docker-v2");
    let (image, _) = pull(
        &client,
        &format!("{}/test/docker:v2", registry.addr()),
        &PullOptions::default(),
    )
    .unwrap();
    let manifest = fs::read_to_string(client.store().blob_path(image.digest())).unwrap();
    assert!(
        manifest.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{manifest}"
    );
    assert!(
        manifest.contains("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        "{manifest}"
    );
    assert_eq!(
        image.config().env,
        client.load_dir(&images.busybox, None).unwrap().config().env
    );
    assert!(image.rootfs().unwrap().is_file());
    fs::remove_dir_all(root).unwrap();
}

/// An OCI layout (tag `latest`) whose only layer is a gzip bomb: about
/// 1 MiB of gzip holding a tar of one 1 GiB file of zeros. Built as
/// gzip members (header, 64 × 16 MiB of zeros, end of archive), which
/// decoders read as one stream, so the test never holds 1 GiB.
fn bomb_layout(dir: &Path) -> cc_image::Digest {
    use std::io::Write as _;
    const FILE: u64 = 1 << 30;
    let gzip = |data: &[u8]| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    };
    let mut header = tar::Header::new_gnu();
    header.set_path("bomb").unwrap();
    header.set_size(FILE);
    header.set_mode(0o644);
    header.set_cksum();
    let mut layer = gzip(header.as_bytes());
    let zeros = gzip(&vec![0u8; 16 << 20]);
    for _ in 0..FILE / (16 << 20) {
        layer.extend_from_slice(&zeros);
    }
    layer.extend(gzip(&[0u8; 1024]));
    assert!(layer.len() < 2 << 20, "{} bytes", layer.len());

    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = cc_image::Digest::of(bytes);
        fs::write(blobs.join(d.hex()), bytes).unwrap();
        d
    };
    let layer_digest = put(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": cc_image::host_platform().architecture, "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [cc_image::Digest::of(b"").to_string()]},
    }))
    .unwrap();
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest.to_string(), "size": layer.len()}],
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest.to_string(), "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": "latest",
                                       "io.containerd.image.name": "localhost/bomb:latest"}}],
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    layer_digest
}

fn assert_bomb_refused(err: Error, layer: &cc_image::Digest) {
    let text = err.to_string();
    assert!(
        matches!(err, Error::LayerTooLarge { .. }),
        "a bomb is refused as too large: {text}"
    );
    assert!(text.contains(&layer.to_string()), "names the layer: {text}");
    assert!(
        text.contains("expansion ratio") && text.contains("bytes compressed) expands past"),
        "says which limit and the sizes: {text}"
    );
}

#[test]
fn gzip_bombs_are_refused_on_load_and_pull() {
    let dir = std::env::temp_dir().join(format!("cc-image-bomb-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let layer = bomb_layout(&dir);

    let (client, root) = store("bomb-load");
    let err = client.load_dir(&dir, None).unwrap_err();
    assert_bomb_refused(err, &layer);
    assert!(client.images().unwrap().is_empty(), "nothing named");
    assert!(
        !root.join("rootfs").read_dir().unwrap().any(|_| true),
        "no root image"
    );

    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&dir, "latest", "test/bomb:1");
    let (client, pulled_root) = store("bomb-pull");
    let reference = format!("{}/test/bomb:1", registry.addr());
    let err = pull(&client, &reference, &PullOptions::default())
        .map(drop)
        .unwrap_err();
    assert_bomb_refused(err, &layer);
    assert!(client.images().unwrap().is_empty(), "nothing named");
    assert!(
        !pulled_root.join("rootfs").read_dir().unwrap().any(|_| true),
        "no root image"
    );
    assert_eq!(temp_files(&pulled_root), 0);

    let zero = PullOptions {
        limits: cc_image::UnpackLimits {
            max_image_bytes: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let err = pull(&client, &reference, &zero).map(drop).unwrap_err();
    assert!(err.to_string().contains("max_image_bytes"), "{err}");
    for d in [dir, root, pulled_root] {
        fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn images_report_the_bytes_they_take_root_image_included() {
    let images = test_images();
    let (client, root) = store("usage");
    let image = client.load_dir(&images.busybox, None).unwrap();
    let listed = |client: &Client| client.images().unwrap()[0].size;
    let before = listed(&client);
    assert!(before >= image.size(), "the blobs count");
    let rootfs = image.rootfs().unwrap();
    let built = std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&rootfs).unwrap()) * 512;
    assert!(built > 0);
    assert!(
        listed(&client) >= before + built,
        "the root image counts: {} < {before} + {built}",
        listed(&client)
    );
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn store_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.busybox, "latest", "test/private:1");
    let (client, root) = store("modes");
    let reference = format!("{}/test/private:1", registry.addr());
    let (image, _) = pull(&client, &reference, &PullOptions::default()).unwrap();
    image.rootfs().unwrap();
    client.load_dir(&images.busybox_layers, None).unwrap();
    let mut seen = 0;
    let mut stack = vec![root.clone()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        seen += 1;
    }
    assert!(seen > 10, "walked the store: {seen} entries");
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn bearer_token_registry_pulls_with_credentials_only() {
    let (registry, reference, client, root) =
        private_registry(RegistryAuth::token("tester", "s3cret"), "token");

    let err = pull(&client, &reference, &PullOptions::default()).unwrap_err();
    assert!(err.is_network(), "anonymous: {err}");
    let text = err.to_string();
    assert!(text.contains("Authentication failure"), "anonymous: {text}");
    assert!(text.contains("no credentials given"), "anonymous: {text}");
    let err = pull(&client, &reference, &with_auth("tester", "nope")).unwrap_err();
    assert!(err.is_network(), "wrong password: {err}");
    assert!(
        err.to_string()
            .contains("Authentication failure: {\"details\":\"incorrect username or password\"}"),
        "wrong password: {err}"
    );
    assert_eq!(temp_files(&root), 0);
    assert!(client.images().unwrap().is_empty());

    let (image, _) = pull(&client, &reference, &with_auth("tester", "s3cret")).unwrap();
    assert_eq!(
        image.digest().to_string(),
        registry.digest("private/busybox:1")
    );
    assert!(image.rootfs().unwrap().exists());
    fs::remove_dir_all(root).unwrap();
}

/// A registries.conf in ROOT with TEXT; PullOptions that use it.
fn conf(root: &Path, text: &str) -> PullOptions {
    fs::create_dir_all(root).unwrap();
    let path = root.join("registries.conf");
    fs::write(&path, text).unwrap();
    PullOptions {
        registries_conf: Some(path),
        ..Default::default()
    }
}

/// `127.0.0.1:PORT` where nothing listens.
fn dead_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn registries_conf_mirror_serves_a_short_name() {
    let images = test_images();
    let mirror = Registry::start(RegistryAuth::Anonymous);
    mirror.push(&images.busybox, "latest", "alpine:latest");
    let fallback = Registry::start(RegistryAuth::Anonymous);
    fallback.push(&images.busybox_layers, "latest", "layers:v1");
    let (client, root) = store("mirror");
    // The search registry's own location is unreachable: only the mirror
    // can serve `alpine`.
    let options = conf(
        &root.join("conf"),
        &format!(
            r#"
unqualified-search-registries = ["registry.invalid"]

[[registry]]
prefix = "registry.invalid"
location = "{dead}"

[[registry]]
prefix = "registry.invalid/layers"
location = "{fallback}/layers"

[[registry.mirror]]
location = "{mirror}/layers"
"#,
            dead = dead_addr(),
            fallback = fallback.addr(),
            mirror = mirror.addr(),
        ),
    );
    let mut short = options.clone();
    short.registries_conf = Some(root.join("conf/short.conf"));
    fs::write(
        root.join("conf/short.conf"),
        format!(
            "unqualified-search-registries = [\"registry.invalid\"]\n\
             [[registry]]\nprefix = \"registry.invalid\"\nlocation = \"{}\"\n\
             [[registry.mirror]]\nlocation = \"{}\"\n",
            dead_addr(),
            mirror.addr()
        ),
    )
    .unwrap();
    let (image, _) = pull(&client, "alpine", &short).unwrap();
    assert_eq!(image.name(), Some("registry.invalid/alpine:latest"));
    assert_eq!(image.digest().to_string(), mirror.digest("alpine:latest"));

    // Stored under the name it resolved to: found again without a registry.
    let mirror_addr = mirror.addr();
    drop(mirror);
    let (again, _) = pull(&client, "alpine", &short).unwrap();
    assert_eq!(again.digest(), image.digest());

    // The mirror lacks `layers`: the registry's location serves it.
    let (layers, _) = pull(&client, "layers:v1", &options).unwrap();
    assert_eq!(layers.name(), Some("registry.invalid/layers:v1"));
    assert_eq!(layers.digest().to_string(), fallback.digest("layers:v1"));

    // Nothing anywhere: every place tried is named.
    let err = pull(&client, "layers:missing", &options).unwrap_err();
    let text = err.to_string();
    assert!(err.is_network(), "{text}");
    for place in [
        mirror_addr.as_str(),
        &fallback.addr(),
        "registry.invalid/layers:missing",
    ] {
        assert!(text.contains(place), "{place} in {text}");
    }
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn registries_conf_insecure_allows_plain_http() {
    let images = test_images();
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&images.busybox, "latest", "busybox:1");
    // 127.0.0.1 written as one number: the same address, but not a name
    // pulls recognise as loopback (which they always reach over plain HTTP).
    let port = registry.addr().rsplit_once(':').unwrap().1.to_string();
    let location = format!("2130706433:{port}");
    let reference = "insecure.test/busybox:1";
    let (client, root) = store("insecure");
    let secure = conf(
        &root.join("secure"),
        &format!("[[registry]]\nprefix = \"insecure.test\"\nlocation = \"{location}\"\n"),
    );
    let err = pull(&client, reference, &secure).unwrap_err();
    assert!(err.is_network(), "{err}");

    let insecure = conf(
        &root.join("insecure"),
        &format!(
            "[[registry]]\nprefix = \"insecure.test\"\nlocation = \"{location}\"\ninsecure = true\n"
        ),
    );
    let (image, _) = pull(&client, reference, &insecure).unwrap();
    assert_eq!(image.name(), Some(reference));
    assert_eq!(image.digest().to_string(), registry.digest("busybox:1"));
    fs::remove_dir_all(root).unwrap();
}

#[test]
fn registries_conf_blocked_and_malformed_are_clear_errors() {
    let (client, root) = store("conf-errors");
    let blocked_addr = dead_addr();
    let blocked = conf(
        &root.join("blocked"),
        &format!("[[registry]]\nlocation = \"{blocked_addr}\"\nblocked = true\n"),
    );
    let err = pull(&client, &format!("{blocked_addr}/x:1"), &blocked).unwrap_err();
    assert!(matches!(err, Error::Blocked { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("blocked"), "{text}");
    assert!(
        text.contains(&root.join("blocked/registries.conf").display().to_string()),
        "{text}"
    );

    let malformed = conf(
        &root.join("malformed"),
        "unqualified-search-registries = [\"a.test\"]\n\n[[registry]]\nlocation = \"a.test\"\ninsecure = maybe\n",
    );
    let err = pull(&client, "alpine", &malformed).unwrap_err();
    let path = root.join("malformed/registries.conf").display().to_string();
    assert!(
        matches!(&err, Error::RegistriesConf { path: p, line: Some(5), .. } if *p == path),
        "{err:?}"
    );
    assert!(
        err.to_string().starts_with(&format!("{path} line 5: ")),
        "{err}"
    );

    let missing = PullOptions {
        registries_conf: Some(root.join("nowhere.conf")),
        ..Default::default()
    };
    let err = pull(&client, "alpine", &missing).unwrap_err();
    assert!(err.to_string().contains("nowhere.conf"), "{err}");
    assert!(client.images().unwrap().is_empty());
    fs::remove_dir_all(root).unwrap();
}

/// A loopback HTTP front for `upstream` that answers every request with a
/// `Range` header 416, as a registry without range support may, and
/// passes the rest through one connection each. Returns its address and
/// how many ranged requests it refused.
fn range_refusing_front(upstream: String) -> (String, std::sync::Arc<AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let refused = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = refused.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let upstream = upstream.clone();
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if !lower.starts_with("connection:") {
                        head.push(line);
                    }
                }
                let mut conn = conn;
                if head
                    .iter()
                    .any(|l| l.to_ascii_lowercase().starts_with("range:"))
                {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let _ = conn.write_all(
                        b"HTTP/1.1 416 Range Not Satisfiable\r\n\
                          Content-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    return;
                }
                let mut up = std::net::TcpStream::connect(&upstream).unwrap();
                let request = format!("{}Connection: close\r\n\r\n", head.concat());
                up.write_all(request.as_bytes()).unwrap();
                let _ = std::io::copy(&mut up, &mut conn);
            });
        }
    });
    (addr, refused)
}

#[test]
fn a_registry_refusing_ranges_still_serves_whole_blobs() {
    let registry = Registry::start(RegistryAuth::Anonymous);
    registry.push(&test_images().busybox, "latest", "norange/busybox:1");
    let (front, refused) = range_refusing_front(registry.addr().to_string());
    let (client, root) = store("norange");
    let reference = format!("{front}/norange/busybox:1");
    let (image, _) = pull(&client, &reference, &PullOptions::default()).unwrap();
    assert_eq!(
        image.digest().to_string(),
        registry.digest("norange/busybox:1")
    );
    assert!(image.rootfs().unwrap().is_file());
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "the pull never asked for a range"
    );
    fs::remove_dir_all(root).unwrap();
}
