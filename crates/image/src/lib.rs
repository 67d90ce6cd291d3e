//! crumblecracker's OCI image store: pulling from registries, loading and
//! exporting image layouts and `docker save` archives, and turning an
//! image's layers into the read-only root filesystem instances boot from.
//!
//! This crate owns image content: a content-addressed store under a cache
//! directory where every blob is verified by digest, names (`refs`) that
//! point at manifests, and one erofs root image per distinct layer stack,
//! built once. It knows nothing of VMs: the core asks it for an [`Image`]
//! and that image's [`Image::rootfs`]. Layer tars are untrusted input and
//! are never unpacked onto the host filesystem (see [`layers`]).
//!
//! Pulls run on a private single-threaded tokio runtime for the duration
//! of the call; the API is blocking.

mod config;
mod digest;
mod error;
mod image;
pub mod layers;
mod layout;
mod platform;
mod registry;
mod store;

use std::collections::HashSet;
use std::fs;
use std::path::Path;

pub use config::ImageConfig;
pub use digest::Digest;
pub use error::{Error, Result};
pub use image::Image;
pub use platform::{host_platform, Platform};
pub use registry::{Auth, CancelToken, Progress, PullOptions, PullPolicy};
pub use store::{RefRecord, Store};

/// Default bound on how far one layer may expand when decompressed.
pub const DEFAULT_MAX_LAYER_BYTES: u64 = 64 << 30;

/// The canonical form of an image name: `alpine` → `docker.io/library/alpine:latest`.
pub fn normalize_name(name: &str) -> Result<String> {
    let r: oci_client::Reference = name
        .parse()
        .map_err(|_| Error::BadReference(name.to_string()))?;
    Ok(r.whole())
}

/// A listed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub name: String,
    pub digest: Digest,
    /// Compressed size of its layers.
    pub size: u64,
}

/// What [`Client::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub blobs: usize,
    pub root_images: usize,
    pub bytes: u64,
}

/// The image store and the operations on it.
#[derive(Debug, Clone)]
pub struct Client {
    store: Store,
    max_layer_bytes: u64,
}

impl Client {
    /// Opens the store at `root`.
    pub fn open(root: impl Into<std::path::PathBuf>) -> Result<Client> {
        Ok(Client {
            store: Store::open(root)?,
            max_layer_bytes: DEFAULT_MAX_LAYER_BYTES,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Bounds how far one layer may expand (a decompression bomb is an error).
    pub fn set_max_layer_bytes(&mut self, bytes: u64) {
        self.max_layer_bytes = bytes;
    }

    pub fn max_layer_bytes(&self) -> u64 {
        self.max_layer_bytes
    }

    /// Pulls `reference` (`alpine`, `host:port/repo:tag`, `repo@sha256:…`).
    /// `progress` is called as bytes arrive; `cancel` stops the pull
    /// promptly, leaving nothing half-written in the store.
    pub fn pull(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: &mut dyn FnMut(&Progress),
        cancel: &CancelToken,
    ) -> Result<Image> {
        registry::pull(&self.store, reference, options, progress, cancel)
    }

    /// Loads the image an OCI layout directory holds.
    pub fn load_dir(&self, dir: &Path, platform: Option<&Platform>) -> Result<Image> {
        layout::load_dir(&self.store, dir, platform)
    }

    /// Loads an OCI layout archive or a `docker save` archive.
    pub fn load_tar(&self, path: &Path, platform: Option<&Platform>) -> Result<Image> {
        layout::load_tar(&self.store, path, platform)
    }

    /// Writes `image` as an OCI layout directory.
    pub fn export_dir(&self, image: &Image, dir: &Path) -> Result<()> {
        layout::export_dir(&self.store, image, dir)
    }

    /// A stored image by name (normalized) or manifest digest.
    pub fn image(&self, name_or_digest: &str) -> Result<Image> {
        if let Ok(digest) = name_or_digest.parse::<Digest>() {
            if self.store.has_blob(&digest) {
                return Image::open(&self.store, None, digest);
            }
        }
        let name = normalize_name(name_or_digest)?;
        let digest = self
            .store
            .get_ref(&name)
            .ok_or_else(|| Error::NotFound(name.clone()))?;
        Image::open(&self.store, Some(name), digest)
    }

    /// Every named image.
    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        let mut out = Vec::new();
        for r in self.store.refs()? {
            let digest: Digest = r.digest.parse()?;
            let size = Image::open(&self.store, None, digest.clone())
                .map(|i| i.size())
                .unwrap_or(0);
            out.push(ImageSummary {
                name: r.name,
                digest,
                size,
            });
        }
        Ok(out)
    }

    /// Forgets the name `name`; its content stays until [`Client::prune`].
    pub fn remove(&self, name: &str) -> Result<bool> {
        self.store.remove_ref(&normalize_name(name)?)
    }

    /// Removes blobs and root images no named image uses.
    pub fn prune(&self) -> Result<PruneStats> {
        let mut keep_blobs = HashSet::new();
        let mut keep_roots = HashSet::new();
        for r in self.store.refs()? {
            let digest: Digest = r.digest.parse()?;
            let Ok(image) = Image::open(&self.store, None, digest.clone()) else {
                continue;
            };
            keep_blobs.insert(digest.hex().to_string());
            keep_blobs.insert(
                image
                    .manifest()
                    .config()
                    .digest()
                    .to_string()
                    .trim_start_matches("sha256:")
                    .to_string(),
            );
            for l in image.layers()? {
                keep_blobs.insert(l.hex().to_string());
            }
            keep_roots.insert(format!("{}.erofs", image.rootfs_key()?));
        }
        let mut stats = PruneStats::default();
        for (dir, keep, is_blob) in [
            ("blobs/sha256", &keep_blobs, true),
            ("rootfs", &keep_roots, false),
        ] {
            let path = self.store.root().join(dir);
            for entry in fs::read_dir(&path)
                .map_err(Error::io("read", &path))?
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                if keep.contains(&name) {
                    continue;
                }
                stats.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(entry.path()).map_err(Error::io("remove", entry.path()))?;
                if is_blob {
                    stats.blobs += 1;
                } else {
                    stats.root_images += 1;
                }
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_short_names_are_normalized() {
        assert_eq!(
            normalize_name("alpine").unwrap(),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(
            normalize_name("alpine:3.19").unwrap(),
            "docker.io/library/alpine:3.19"
        );
        assert_eq!(
            normalize_name("user/app").unwrap(),
            "docker.io/user/app:latest"
        );
        assert_eq!(
            normalize_name("127.0.0.1:5000/a/b:c").unwrap(),
            "127.0.0.1:5000/a/b:c"
        );
        let pinned = format!("ghcr.io/x/y@sha256:{}", "a".repeat(64));
        assert_eq!(normalize_name(&pinned).unwrap(), pinned);
        for bad in ["", "library/UPPER", "a b", "x:y:z"] {
            assert!(
                matches!(normalize_name(bad), Err(Error::BadReference(_))),
                "{bad}"
            );
        }
    }
}
