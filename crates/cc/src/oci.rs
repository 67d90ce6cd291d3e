//! OCI images for instances: the store, pulls, loads and exports.

use std::path::{Path, PathBuf};

pub use cc_image::{
    printable, Auth, CancelToken, Digest, Image, ImageConfig, ImageSummary, Platform, Progress,
    PruneStats, PullOptions, PullPolicy, UnpackLimits,
};

use crate::error::Result;

/// The image store a program pulls into and boots from.
#[derive(Debug, Clone)]
pub struct OciClient {
    inner: cc_image::Client,
}

impl OciClient {
    /// Opens the store under `cache_dir`, or the per-user default
    /// (`<cache>/oci`, see `CC_CACHE_DIR`).
    pub fn new(cache_dir: Option<&Path>) -> Result<OciClient> {
        let root: PathBuf = match cache_dir {
            Some(dir) => dir.to_path_buf(),
            None => cc_engine::paths::cache_dir().join("oci"),
        };
        Ok(OciClient {
            inner: cc_image::Client::open(root)?,
        })
    }

    /// Bounds how far layers may expand on [`OciClient::load_tar`] and
    /// [`OciClient::load_dir`] (pulls take [`PullOptions::limits`]).
    pub fn set_unpack_limits(&mut self, limits: UnpackLimits) -> Result<()> {
        limits.validate()?;
        self.inner.set_unpack_limits(limits);
        Ok(())
    }

    pub(crate) fn inner(&self) -> &cc_image::Client {
        &self.inner
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        self.inner.store().root()
    }

    /// Pulls `reference`; `progress` sees every chunk, `cancel` stops it.
    pub fn pull(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: &mut dyn FnMut(&Progress),
        cancel: &CancelToken,
    ) -> Result<Image> {
        Ok(self.inner.pull(reference, options, progress, cancel)?)
    }

    /// Loads a `docker save` archive or an OCI layout archive.
    pub fn load_tar(&self, path: &Path) -> Result<Image> {
        Ok(self.inner.load_tar(path, None)?)
    }

    /// [`load_tar`](Self::load_tar) that `cancel` stops with
    /// [`Error::Cancelled`](crate::Error::Cancelled) (`load cancelled`),
    /// leaving nothing half-written in the store.
    pub fn load_tar_cancellable(&self, path: &Path, cancel: &CancelToken) -> Result<Image> {
        Ok(self.inner.load_tar_cancellable(path, None, cancel)?)
    }

    /// Loads an OCI image layout directory.
    pub fn load_dir(&self, dir: &Path) -> Result<Image> {
        Ok(self.inner.load_dir(dir, None)?)
    }

    /// [`load_dir`](Self::load_dir) that `cancel` stops like
    /// [`load_tar_cancellable`](Self::load_tar_cancellable).
    pub fn load_dir_cancellable(&self, dir: &Path, cancel: &CancelToken) -> Result<Image> {
        Ok(self.inner.load_dir_cancellable(dir, None, cancel)?)
    }

    /// Writes `image` as an OCI image layout directory.
    pub fn export_dir(&self, image: &Image, dir: &Path) -> Result<()> {
        Ok(self.inner.export_dir(image, dir)?)
    }

    /// A stored image by name or manifest digest.
    pub fn image(&self, name_or_digest: &str) -> Result<Image> {
        Ok(self.inner.image(name_or_digest)?)
    }

    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        Ok(self.inner.images()?)
    }

    /// Forgets a name; [`OciClient::prune`] then frees what nothing uses.
    pub fn remove(&self, name: &str) -> Result<bool> {
        Ok(self.inner.remove(name)?)
    }

    pub fn prune(&self) -> Result<PruneStats> {
        Ok(self.inner.prune()?)
    }
}
