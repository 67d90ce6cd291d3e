//! The cache directory as a whole: what each kind of cached file takes and
//! pruning it (`crumble system df|prune`). Everything here but named
//! images is rebuilt on demand; named images go with
//! [`OciClient::remove`](crate::OciClient::remove).

use std::fmt;
use std::path::Path;

pub use cc_engine::cache::{Removed, Usage};

use crate::error::Result;
use crate::oci::OciClient;

/// A kind of cached file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// Named images: their manifests, configs and layers. `count` is the
    /// number of names.
    Images,
    /// Read-only root filesystem images, built from image layers or from
    /// host directories (`Source::Dir`).
    RootImages,
    /// Warm-start templates.
    Templates,
    /// Instances' writable disks (in run directories) and the blank disks
    /// they are copied from.
    WritableLayers,
    /// The initramfs holding the guest agent, one per agent binary.
    BootFiles,
}

impl fmt::Display for CacheKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheKind::Images => "images",
            CacheKind::RootImages => "root images",
            CacheKind::Templates => "templates",
            CacheKind::WritableLayers => "writable layers",
            CacheKind::BootFiles => "boot files",
        })
    }
}

/// What one kind takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUsage {
    pub kind: CacheKind,
    pub usage: Usage,
}

/// What [`prune`] removed of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePruned {
    pub kind: CacheKind,
    pub removed: Removed,
}

/// The cache directory in use (`CC_CACHE_DIR`, else the per-user default).
pub fn dir() -> std::path::PathBuf {
    cc_engine::paths::cache_dir()
}

/// What each kind takes in the cache, with what [`prune`] (not `all`)
/// would free.
pub fn usage() -> Result<Vec<CacheUsage>> {
    let cache = dir();
    let store = OciClient::new(None)?.inner().usage()?;
    let mut root_images = cc_engine::cache::kept_files(&host_root_images(&cache))?;
    root_images.count += store.root_images.count;
    root_images.bytes += store.root_images.bytes;
    root_images.reclaimable += store.root_images.reclaimable;
    let mut templates = Usage::default();
    for t in crate::templates::list()? {
        templates.count += 1;
        templates.bytes += t.bytes;
        if t.stale {
            templates.reclaimable += t.bytes;
        }
    }
    Ok(vec![
        CacheUsage {
            kind: CacheKind::Images,
            usage: Usage {
                count: store.images,
                bytes: store.content.bytes,
                reclaimable: store.content.reclaimable,
            },
        },
        CacheUsage {
            kind: CacheKind::RootImages,
            usage: root_images,
        },
        CacheUsage {
            kind: CacheKind::Templates,
            usage: templates,
        },
        CacheUsage {
            kind: CacheKind::WritableLayers,
            usage: cc_engine::cache::writable_layers(&cache)?,
        },
        CacheUsage {
            kind: CacheKind::BootFiles,
            usage: cc_engine::cache::boot_files(&cache)?,
        },
    ])
}

/// Removes what nothing uses: image content no named image refers to,
/// stale templates, run directories of dead processes, boot files of other
/// agents. With `all`, also every template, every root image built from a
/// host directory, the blank writable disks and every boot file: the next
/// start rebuilds what it needs, more slowly. Named images, and what
/// running instances use, always stay.
pub fn prune(all: bool) -> Result<Vec<CachePruned>> {
    let cache = dir();
    let store = OciClient::new(None)?.inner().prune()?;
    let mut root_images = Removed {
        count: store.root_images,
        bytes: store.root_image_bytes,
    };
    if all {
        let host = cc_engine::cache::remove_kept_files(&host_root_images(&cache))?;
        root_images.count += host.count;
        root_images.bytes += host.bytes;
    }
    let templates = crate::templates::remove_where(|t| all || t.stale)?;
    Ok(vec![
        CachePruned {
            kind: CacheKind::Images,
            removed: Removed {
                count: store.blobs,
                bytes: store.bytes - store.root_image_bytes,
            },
        },
        CachePruned {
            kind: CacheKind::RootImages,
            removed: root_images,
        },
        CachePruned {
            kind: CacheKind::Templates,
            removed: templates,
        },
        CachePruned {
            kind: CacheKind::WritableLayers,
            removed: cc_engine::cache::prune_writable_layers(&cache, all)?,
        },
        CachePruned {
            kind: CacheKind::BootFiles,
            removed: cc_engine::cache::prune_boot_files(&cache, all)?,
        },
    ])
}

fn host_root_images(cache: &Path) -> std::path::PathBuf {
    cache.join(crate::rootfs::IMAGES_DIR)
}
