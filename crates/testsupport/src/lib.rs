//! Test support for crumblecracker, for other crates' tests (a dev-dependency only).
//!
//! - [`test_images`] and [`debian_image`]: the OCI image layouts and archives built
//!   (and cached) by `scripts/make-test-images.py`.
//! - [`Registry`]: a real local registry (Distribution's `docker-registry`) on a
//!   loopback port, anonymous, with htpasswd auth, or with bearer tokens from a
//!   token server of its own (as the large public registries do), that
//!   layouts are pushed to with `skopeo`.
//!
//! - [`Screen`]: what a terminal's output shows, read by a thread, waited for
//!   by text.
//!
//! Everything here panics with a descriptive message on failure, as test
//! helpers do. Missing system tools (`python3`, `docker-registry`, `skopeo`,
//! `htpasswd`, `openssl`, `zstd`, `debootstrap`) are reported, never skipped:
//! `scripts/setup.sh` installs them (`openssl` comes with `ca-certificates`).

mod registry;
mod screen;
mod token;

pub use registry::{Auth, HttpResponse, Registry};
pub use screen::{openpty, Screen};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// crumblecracker's cache directory: `$CC_CACHE_DIR`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/crumblecracker` (the scripts' rule).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CC_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache")
        });
    base.join("crumblecracker")
}

/// The repository's `scripts` directory.
pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

/// Where `scripts/make-test-images.py` puts the test images: `cache_dir()/test-images`.
pub fn test_images_dir() -> PathBuf {
    cache_dir().join("test-images")
}

/// Paths of the small test images (see `scripts/make-test-images.py`).
///
/// Each layout is an OCI image layout directory whose `index.json` names one
/// manifest (or index) with the tag `latest`. They live in a shared cache:
/// copy one before changing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestImages {
    /// The busybox-static tree in one gzip layer; `Cmd ["sh"]`,
    /// `Env [PATH, CC_IMAGE=busybox]`; users root, alice (1000), nobody.
    pub busybox: PathBuf,
    /// The busybox tree in three layers: gzip (tree plus `/data` fixtures, a
    /// hard link pair, a symlink), zstd (whiteout of `/data/remove-me`, opaque
    /// `/data/opaque`, a 1234:5678 0640 file, a setuid file, `user.cc.test=hello`
    /// on `/data/xattr`, char device `/data/null` 1:3) and uncompressed
    /// (`/data/layer3`); `Entrypoint ["/bin/echo","entry:"]`, `Cmd ["default-arg"]`,
    /// `User alice`, `WorkingDir /data`.
    pub busybox_layers: PathBuf,
    /// An image index: linux/amd64 = the busybox manifest, linux/arm64/v8 =
    /// a manifest with one layer holding only `/ARCH` (`arm64`, no newline).
    pub multiarch: PathBuf,
    /// The busybox image as a classic `docker save` archive (`manifest.json`,
    /// `<config>.json`, `<id>/layer.tar`, `repositories`), tagged `busybox:latest`.
    pub busybox_docker_tar: PathBuf,
    /// The busybox layout as an OCI image layout tar archive (as
    /// `skopeo copy oci-archive:` writes), tag `latest`.
    pub busybox_oci_tar: PathBuf,
}

/// Builds (once per process; cached on disk across runs) and returns the small
/// test images: `make-test-images.py --only busybox,busybox-layers,multiarch`.
/// Takes about a second cold and a fraction of one warm.
pub fn test_images() -> TestImages {
    static IMAGES: OnceLock<TestImages> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let built = make_test_images("busybox,busybox-layers,multiarch");
            let get = |name: &str| {
                built.get(name).cloned().unwrap_or_else(|| {
                    panic!("make-test-images.py did not report `{name}` (got {built:?})")
                })
            };
            TestImages {
                busybox: get("busybox"),
                busybox_layers: get("busybox-layers"),
                multiarch: get("multiarch"),
                busybox_docker_tar: get("busybox-docker"),
                busybox_oci_tar: get("busybox-oci"),
            }
        })
        .clone()
}

/// Builds (once per process; cached on disk) and returns the Debian layout: a
/// `debootstrap --variant=minbase` of the machine's release from the machine's
/// apt mirror in one gzip layer, tagged with the release codename (`bookworm`),
/// `Cmd ["bash"]`. Takes a few minutes the first time, seconds afterwards.
pub fn debian_image() -> PathBuf {
    static DEBIAN: OnceLock<PathBuf> = OnceLock::new();
    DEBIAN
        .get_or_init(|| {
            let built = make_test_images("debian");
            built.get("debian").cloned().unwrap_or_else(|| {
                panic!("make-test-images.py did not report `debian` (got {built:?})")
            })
        })
        .clone()
}

/// Runs `make-test-images.py --only ONLY` (its progress on our stderr) and
/// parses its `NAME PATH` lines.
fn make_test_images(only: &str) -> HashMap<String, PathBuf> {
    let script = scripts_dir().join("make-test-images.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg("--out")
        .arg(test_images_dir())
        .args(["--only", only])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} --only {only} failed ({}); its stderr is above; stdout:\n{stdout}",
        script.display(),
        out.status
    );
    stdout
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(name, path)| (name.to_string(), PathBuf::from(path)))
        .collect()
}
