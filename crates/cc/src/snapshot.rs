//! Filesystem snapshots: an instance's writable layer captured as an OCI
//! layer on top of what it booted from, usable as the source of new
//! instances and exportable as an image.
//!
//! A snapshot is an image in the store: the base it stands on, then one
//! layer per snapshot in its chain. The base of an instance booted from an
//! image is that image's layers. An instance booted from a host directory
//! booted from the directory's cached erofs image, and that very file
//! (hard-linked where possible) becomes the base: one layer of erofs media
//! type ([`cc_image::Client::erofs_image`]). So taking the snapshot
//! archives nothing, booting from it stacks the snapshot layers on the
//! file as it is, and the snapshot no longer depends on the directory.
//! Only exporting writes that base as a tar layer, since an OCI layout
//! must hold tar.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cc_protocol::{Request, Response};

use crate::error::{Error, Result};
use crate::instance::{Instance, Source, REQUEST_TIMEOUT};
use crate::oci::{Image, OciClient};
use crate::process::ChildOutput;
use crate::rootfs;

/// A captured filesystem. It lives in the image store under its
/// [`Snapshot::name`] (listed by `crumble images`, removed by `crumble
/// rmi`), independent of the instance it was taken from.
#[derive(Debug, Clone)]
pub struct Snapshot {
    image: Image,
    /// How many of the image's layers are the base the snapshot layers sit
    /// on; the rest are snapshot layers, one per snapshot in the chain.
    base_layers: usize,
}

impl Snapshot {
    /// The image: base layers plus one layer per snapshot in the chain.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The store name, `localhost/cc-snapshots:<instance>-<n>`.
    pub fn name(&self) -> &str {
        self.image.name().unwrap_or_default()
    }

    /// A source for [`Instance::new`].
    pub fn as_source(&self) -> Source {
        Source::Snapshot(Box::new(self.clone()))
    }

    /// Writes the snapshot as an OCI image layout (readable by skopeo,
    /// docker and [`OciClient::load_dir`]).
    pub fn export_dir(&self, dir: &Path) -> Result<()> {
        Ok(self.image.client().export_dir(&self.image, dir)?)
    }

    /// Read-only root layers to boot from, uppermost first: each snapshot
    /// layer on its own, then the base. Booting needs no flattening copy.
    pub(crate) fn lowers(&self) -> Result<Vec<PathBuf>> {
        let client = self.image.client();
        let layers = self.image.layers()?;
        let mut lowers = Vec::new();
        for layer in layers[self.base_layers..].iter().rev() {
            lowers.push(client.overlay_rootfs(layer)?);
        }
        lowers.push(self.image.rootfs_prefix(self.base_layers)?);
        Ok(lowers)
    }
}

/// What an instance booted from, for its snapshots.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    /// A host directory, and the root image the instance booted from.
    Dir {
        dir: PathBuf,
        image: PathBuf,
    },
    Image(Box<Image>),
    Snapshot(Box<Snapshot>),
    /// Restored from a park (see [`Instance::restore`]).
    Restored,
}

/// Snapshots need the image an instance booted from, which a park does
/// not keep.
fn not_of_restored() -> Error {
    Error::InvalidArgument("a restored instance cannot be snapshotted (not supported yet)".into())
}

static SNAPSHOT_SEQ: AtomicU64 = AtomicU64::new(0);

impl Instance {
    /// Captures the instance's whole filesystem without stopping it: its
    /// writable layer becomes one new layer over what it booted from (no
    /// full copy). Paths matching `exclude` globs (`*`, `?`, `**`; without
    /// a leading `/` they match at any depth) are left out. So is what was
    /// written into `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf`,
    /// which every instance generates on a tmpfs of its own.
    pub fn snapshot_filesystem(&self, exclude: &[&str]) -> Result<Snapshot> {
        let inner = self.inner();
        inner.check_running()?;
        let client = match &inner.origin {
            Origin::Image(image) => image.client(),
            Origin::Snapshot(s) => s.image.client(),
            Origin::Dir { .. } => OciClient::new(None)?.inner().clone(),
            Origin::Restored => return Err(not_of_restored()),
        };
        // Everything below is stored, then named: a prune in between (in
        // any process) must not take it.
        let _lock = client.write_lock()?;
        let (base, base_layers) = match &inner.origin {
            Origin::Image(image) => (image.as_ref().clone(), image.layers()?.len()),
            Origin::Snapshot(s) => (s.image.clone(), s.base_layers),
            Origin::Dir { dir, image } => {
                // The very image the instance booted from, whatever the
                // directory became since; built again only if someone
                // removed it from the cache.
                let rootfs = if image.is_file() {
                    image.clone()
                } else {
                    rootfs::image_for_dir(dir, &cc_engine::paths::cache_dir())?
                };
                (client.erofs_image(&rootfs)?, 1)
            }
            Origin::Restored => return Err(not_of_restored()),
        };
        let (id, stream) = inner.channel.open_inbound();
        let request = Request::SnapshotUpper {
            stream: id,
            exclude: exclude.iter().map(|e| e.to_string()).collect(),
        };
        match inner.channel.request(request, REQUEST_TIMEOUT) {
            Ok(Ok(Response::Done)) => {}
            Ok(Ok(other)) => {
                inner.channel.close_inbound(id, &stream);
                return Err(Error::Protocol(format!(
                    "unexpected answer to snapshot: {other:?}"
                )));
            }
            Ok(Err(e)) => {
                inner.channel.close_inbound(id, &stream);
                return Err(Error::Guest {
                    op: "snapshot_filesystem".into(),
                    message: e.message,
                });
            }
            Err(e) => {
                inner.channel.close_inbound(id, &stream);
                return Err(e);
            }
        }
        let layer = client.put_layer(ChildOutput::new(inner.clone(), id, stream));
        let (layer, _) = match layer {
            Ok(l) => l,
            Err(e) => return Err(inner.check_running().err().unwrap_or(Error::Image(e))),
        };
        let name = format!(
            "localhost/cc-snapshots:{}-{}",
            inner.id,
            SNAPSHOT_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let image = client.derive_image(Some(&base), &[layer], Some(&name))?;
        Ok(Snapshot { image, base_layers })
    }
}
