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
//! Root images of host directories are built here too, by the same writer
//! ([`HostDir`]): the walker lives with the other tree builders rather than
//! in cc-erofs, which does no I/O of its own, or in the core, which would
//! then build images two ways.
//!
//! Pulls follow the user's `containers-registries.conf` (version 2): short
//! names resolve through `unqualified-search-registries`, and a name's
//! `[[registry]]` table gives the mirrors to try first, its location, and
//! whether it is `insecure` (plain HTTP allowed) or `blocked`. The file is
//! `PullOptions::registries_conf`, else `$CC_REGISTRIES_CONF`, else
//! containers' own files; the README's "Registry configuration" lists what
//! is honoured and what is ignored. Registries that answer with a bearer
//! challenge get a token from their token server with the pull's
//! credentials before anything is fetched.
//!
//! Pulls run on a private single-threaded tokio runtime for the duration
//! of the call; the API is blocking. A pull into a store without the
//! image's root image builds it as the layers download, on threads of its
//! own (see the `stream` module), so it is ready when the pull returns.

mod config;
mod digest;
mod erofs_layer;
mod error;
mod gunzip;
mod hostdir;
mod image;
pub mod layers;
mod layout;
mod platform;
pub mod private;
mod registries;
mod registry;
mod store;
mod stream;

use std::collections::HashSet;
use std::fs;
use std::path::Path;

pub use cc_cancel::CancelToken;
pub use config::ImageConfig;
pub use digest::Digest;
pub use error::{printable, Error, Result};
pub use hostdir::HostDir;
pub use image::{Image, UnpackLimits};
pub use platform::{host_platform, Platform};
pub use registry::{Auth, Progress, PullOptions, PullPolicy};
pub use store::{RefRecord, Store, StoreLock};

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
    /// Host bytes it takes in the store: its blobs and the root images
    /// built from them (see [`Image::disk_usage`]).
    pub size: u64,
}

/// What [`Client::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    pub blobs: usize,
    pub root_images: usize,
    /// Everything removed.
    pub bytes: u64,
    /// Of `bytes`, the root images'.
    pub root_image_bytes: u64,
}

/// The image store and the operations on it.
#[derive(Debug, Clone)]
pub struct Client {
    store: Store,
    limits: UnpackLimits,
}

impl Client {
    /// Opens the store at `root`.
    pub fn open(root: impl Into<std::path::PathBuf>) -> Result<Client> {
        Ok(Client {
            store: Store::open(root)?,
            limits: UnpackLimits::default(),
        })
    }

    pub(crate) fn from_store(store: Store) -> Client {
        Client {
            store,
            limits: UnpackLimits::default(),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Bounds how far layers may expand on load and when root images are
    /// built (a decompression bomb is an error). Pulls take theirs from
    /// [`PullOptions::limits`].
    pub fn set_unpack_limits(&mut self, limits: UnpackLimits) {
        self.limits = limits;
    }

    pub fn unpack_limits(&self) -> &UnpackLimits {
        &self.limits
    }

    /// Pulls `reference` (`alpine`, `host:port/repo:tag`, `repo@sha256:…`).
    /// `progress` is called as bytes arrive; `cancel` stops the pull
    /// promptly, leaving nothing half-written in the store. The image's
    /// root image ([`Image::rootfs`]) is built as its layers arrive.
    pub fn pull(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: &mut dyn FnMut(&Progress),
        cancel: &CancelToken,
    ) -> Result<Image> {
        options.limits.validate()?;
        let _lock = self.store.lock(false)?;
        registry::pull(&self.store, reference, options, progress, cancel)
    }

    /// Loads the image an OCI layout directory holds.
    pub fn load_dir(&self, dir: &Path, platform: Option<&Platform>) -> Result<Image> {
        self.load_dir_cancellable(dir, platform, &CancelToken::new())
    }

    /// [`load_dir`](Self::load_dir) that `cancel` stops between chunks
    /// ([`Error::Cancelled`]), leaving nothing half-written in the store.
    pub fn load_dir_cancellable(
        &self,
        dir: &Path,
        platform: Option<&Platform>,
        cancel: &CancelToken,
    ) -> Result<Image> {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled("load"));
        }
        let _lock = self.store.lock(false)?;
        layout::load_dir(&self.store, dir, platform, &self.limits, cancel)
    }

    /// Loads an OCI layout archive or a `docker save` archive.
    pub fn load_tar(&self, path: &Path, platform: Option<&Platform>) -> Result<Image> {
        self.load_tar_cancellable(path, platform, &CancelToken::new())
    }

    /// [`load_tar`](Self::load_tar) that `cancel` stops between chunks
    /// ([`Error::Cancelled`]), leaving nothing half-written in the store.
    pub fn load_tar_cancellable(
        &self,
        path: &Path,
        platform: Option<&Platform>,
        cancel: &CancelToken,
    ) -> Result<Image> {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled("load"));
        }
        let _lock = self.store.lock(false)?;
        layout::load_tar(&self.store, path, platform, &self.limits, cancel)
    }

    /// Writes `image` as an OCI layout directory.
    pub fn export_dir(&self, image: &Image, dir: &Path) -> Result<()> {
        layout::export_dir(&self.store, image, dir)
    }

    /// A stored image by name (normalized; a short name also as pulls
    /// resolve it through registries.conf) or manifest digest.
    pub fn image(&self, name_or_digest: &str) -> Result<Image> {
        if let Ok(digest) = name_or_digest.parse::<Digest>() {
            if self.store.has_blob(&digest) {
                return Ok(Image::open(&self.store, None, digest)?.with_unpack_limits(self.limits));
            }
        }
        let name = normalize_name(name_or_digest)?;
        let (name, digest) = match self.store.get_ref(&name) {
            Some(digest) => (name, digest),
            // A short name a registries.conf resolved elsewhere when pulled.
            None => registry::lookup(&self.store, name_or_digest)?
                .ok_or_else(|| Error::NotFound(name.clone()))?,
        };
        Ok(Image::open(&self.store, Some(name), digest)?.with_unpack_limits(self.limits))
    }

    /// Every named image.
    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        let mut out = Vec::new();
        for r in self.store.refs()? {
            let digest: Digest = r.digest.parse()?;
            let size = Image::open(&self.store, None, digest.clone())
                .and_then(|i| i.disk_usage())
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

    /// Holds off [`Client::prune`] (in any process) until dropped: take it
    /// around several calls that store content and then name it.
    pub fn write_lock(&self) -> Result<store::StoreLock> {
        self.store.lock(false)
    }

    /// Stores an uncompressed layer tarball; returns its digest and size.
    pub fn put_layer(&self, input: impl std::io::Read) -> Result<(Digest, u64)> {
        self.store.write_blob(None, input, |_| true)
    }

    /// An unnamed image whose one layer is `rootfs`, an erofs root image
    /// cc-erofs wrote (a [`HostDir`]'s): the base of snapshots of
    /// instances booted from a host directory. The store takes the file
    /// itself, hard-linked where the filesystem allows (else copied), so a
    /// snapshot stands on the very image its instance booted from, and
    /// later changes to the directory do not reach it. It must never be
    /// written again; root images are only ever replaced by rename.
    pub fn erofs_image(&self, rootfs: &Path) -> Result<Image> {
        erofs_layer::check(rootfs)?;
        let (digest, size) = self.store.link_blob(rootfs)?;
        let layer = (digest, size, erofs_layer::MEDIA_TYPE);
        self.derive(None, &[layer], "crumblecracker host directory", None)
    }

    /// The erofs image of one layer in overlayfs form (whiteouts kept as
    /// overlayfs expects them), to stack above other layers; built once.
    pub fn overlay_rootfs(&self, layer: &Digest) -> Result<std::path::PathBuf> {
        let path = self.store.rootfs_path(&image::overlay_key(layer));
        let blob = self.store.blob_path(layer);
        let size = fs::metadata(&blob).map_err(Error::io("stat", &blob))?.len();
        let tar = image::LayerBlob {
            digest: layer.clone(),
            size,
            erofs: false,
        };
        image::build_erofs(
            &self.store,
            &path,
            &[tar],
            &[],
            layers::Whiteouts::Overlay,
            &self.limits,
        )?;
        Ok(path)
    }

    /// A new image: `base` (or nothing) with the stored uncompressed layer
    /// tarballs `extra` on top, recorded under `name` when given.
    pub fn derive_image(
        &self,
        base: Option<&Image>,
        extra: &[Digest],
        name: Option<&str>,
    ) -> Result<Image> {
        let mut layers = Vec::new();
        for layer in extra {
            let blob = self.store.blob_path(layer);
            let size = fs::metadata(&blob).map_err(Error::io("stat", &blob))?.len();
            layers.push((layer.clone(), size, TAR_LAYER));
        }
        let created_by = "crumblecracker snapshot_filesystem";
        self.derive(base, &layers, created_by, name)
    }

    /// [`Client::derive_image`] with layers of any media type, given as
    /// (digest, size, media type); `created_by` goes in their history.
    fn derive(
        &self,
        base: Option<&Image>,
        extra: &[(Digest, u64, &str)],
        created_by: &str,
        name: Option<&str>,
    ) -> Result<Image> {
        let (mut config, mut layers) = match base {
            Some(b) => {
                let manifest: serde_json::Value =
                    image::parse(&self.store.read_document(b.digest())?, "manifest")?;
                let config_digest: Digest = b.manifest().config().digest().to_string().parse()?;
                let config: serde_json::Value =
                    image::parse(&self.store.read_document(&config_digest)?, "config")?;
                (
                    config,
                    manifest["layers"].as_array().cloned().unwrap_or_default(),
                )
            }
            None => {
                let p = host_platform();
                let config = serde_json::json!({
                    "architecture": p.architecture, "os": p.os, "config": {},
                    "rootfs": {"type": "layers", "diff_ids": []}, "history": [],
                });
                (config, Vec::new())
            }
        };
        for (layer, size, media_type) in extra {
            layers.push(serde_json::json!({
                "mediaType": media_type, "digest": layer.to_string(), "size": size,
            }));
            // Both kinds are stored uncompressed: the diff id is the digest.
            push_array(
                &mut config["rootfs"]["diff_ids"],
                serde_json::json!(layer.to_string()),
            );
            push_array(
                &mut config["history"],
                serde_json::json!({ "created_by": created_by }),
            );
        }
        let config_bytes =
            serde_json::to_vec(&config).map_err(|e| Error::BadDocument(e.to_string()))?;
        let config_digest = self.store.put_document(&config_bytes)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_bytes.len()},
            "layers": layers,
        });
        let digest = self.store.put_document(
            &serde_json::to_vec(&manifest).map_err(|e| Error::BadDocument(e.to_string()))?,
        )?;
        let name = name.map(normalize_name).transpose()?;
        if let Some(name) = &name {
            self.store.set_ref(name, &digest)?;
        }
        Ok(Image::open(&self.store, name, digest)?.with_unpack_limits(self.limits))
    }

    /// What the store holds: named images and their content, root images
    /// built from it, and how much of each [`Client::prune`] would free.
    pub fn usage(&self) -> Result<StoreUsage> {
        let _lock = self.store.lock(false)?;
        let mut usage = StoreUsage {
            images: self.store.refs()?.len(),
            ..StoreUsage::default()
        };
        for (kind, files) in self.stored_files()? {
            let usage = match kind {
                StoredKind::Blob => &mut usage.content,
                StoredKind::RootImage => &mut usage.root_images,
            };
            for f in files {
                usage.count += 1;
                usage.bytes += f.bytes;
                if !f.in_use {
                    usage.reclaimable += f.bytes;
                }
            }
        }
        Ok(usage)
    }

    /// Removes blobs and root images no named image uses.
    pub fn prune(&self) -> Result<PruneStats> {
        let _lock = self.store.lock(true)?;
        let mut stats = PruneStats::default();
        for (kind, files) in self.stored_files()? {
            for f in files.into_iter().filter(|f| !f.in_use) {
                fs::remove_file(&f.path).map_err(Error::io("remove", &f.path))?;
                stats.bytes += f.bytes;
                match kind {
                    StoredKind::Blob => stats.blobs += 1,
                    StoredKind::RootImage => {
                        stats.root_images += 1;
                        stats.root_image_bytes += f.bytes;
                    }
                }
            }
        }
        Ok(stats)
    }

    /// Every blob and root image, each marked with whether a named image
    /// uses it. The caller holds the store's lock.
    fn stored_files(&self) -> Result<[(StoredKind, Vec<StoredFile>); 2]> {
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
            keep_roots.extend(
                image
                    .rootfs_keys()?
                    .into_iter()
                    .map(|k| format!("{k}.erofs")),
            );
        }
        let list = |dir: &str, keep: &HashSet<String>| -> Result<Vec<StoredFile>> {
            let path = self.store.root().join(dir);
            let mut files = Vec::new();
            for entry in fs::read_dir(&path)
                .map_err(Error::io("read", &path))?
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().into_owned();
                files.push(StoredFile {
                    in_use: keep.contains(&name),
                    bytes: image::allocated(&entry.path()),
                    path: entry.path(),
                });
            }
            Ok(files)
        };
        Ok([
            (StoredKind::Blob, list("blobs/sha256", &keep_blobs)?),
            (StoredKind::RootImage, list("rootfs", &keep_roots)?),
        ])
    }
}

/// Space taken by one kind of stored file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub count: usize,
    /// Bytes allocated on the host's disk (sparse files count what they use).
    pub bytes: u64,
    /// Of `bytes`, what nothing uses and a prune would free.
    pub reclaimable: u64,
}

/// What [`Client::usage`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Named images.
    pub images: usize,
    /// Manifests, configs and layers.
    pub content: Usage,
    /// Root filesystem images built from layers.
    pub root_images: Usage,
}

#[derive(Debug, Clone, Copy)]
enum StoredKind {
    Blob,
    RootImage,
}

#[derive(Debug)]
struct StoredFile {
    path: std::path::PathBuf,
    bytes: u64,
    in_use: bool,
}

/// Media type of an uncompressed OCI layer tarball.
pub(crate) const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn push_array(slot: &mut serde_json::Value, item: serde_json::Value) {
    match slot.as_array_mut() {
        Some(items) => items.push(item),
        None => *slot = serde_json::Value::Array(vec![item]),
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
