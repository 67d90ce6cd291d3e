//! Warm-start templates in the cache directory: listing and removing them.
//! Instances build and use them on their own (see
//! [`Options::warm_start`](crate::Options::warm_start)); these calls are
//! for housekeeping (`crumble templates`).

pub use cc_engine::template::{TemplateInfo, TemplateMeta};

use crate::cache::Removed;
use crate::error::Result;

fn cache() -> std::path::PathBuf {
    cc_engine::paths::cache_dir()
}

/// Every template, newest first.
pub fn list() -> Result<Vec<TemplateInfo>> {
    Ok(cc_engine::template::list(&cache())?)
}

/// Removes template `key`; `false` if there is none. Instances restored
/// from it keep running.
pub fn remove(key: &str) -> Result<bool> {
    Ok(cc_engine::template::remove(&cache(), key)?)
}

/// Removes the templates that can never be used again (a file they were
/// built from changed or is gone); returns how many.
pub fn prune() -> Result<usize> {
    Ok(remove_where(|t| t.stale)?.count)
}

/// Removes every template; returns how many.
pub fn clear() -> Result<usize> {
    Ok(remove_where(|_| true)?.count)
}

pub(crate) fn remove_where(pick: impl Fn(&TemplateInfo) -> bool) -> Result<Removed> {
    let mut removed = Removed::default();
    for t in list()?.iter().filter(|t| pick(t)) {
        if remove(&t.meta.key)? {
            removed.count += 1;
            removed.bytes += t.bytes;
        }
    }
    Ok(removed)
}
