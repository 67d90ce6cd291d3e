//! The filesystem tree an image is built from: an arena of nodes with
//! directories mapping names to node ids. Hard links are two names for one
//! node. Nodes no directory reaches are not written.

use std::collections::BTreeMap;

/// Index of a node in its [`Tree`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) usize);

/// Where a regular file's bytes are in the image being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRef {
    /// First block of the contiguous data (0 when `len` is 0).
    pub blkaddr: u32,
    pub len: u64,
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Entries by name (no `.` or `..`: the writer adds them).
    Dir(BTreeMap<Vec<u8>, NodeId>),
    File(DataRef),
    Symlink(Vec<u8>),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
}

/// Ownership, permissions, time and extended attributes of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Permission bits including setuid/setgid/sticky (`0o7777`); the file
    /// type comes from [`Kind`].
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Full names (`user.foo`, `security.capability`, ...) and values.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub meta: Metadata,
}

/// Why a tree operation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("not a directory")]
    NotADirectory,
    #[error("invalid file name {0:?}")]
    BadName(String),
}

/// A filesystem tree rooted at [`Tree::ROOT`].
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    pub const ROOT: NodeId = NodeId(0);

    /// A tree with an empty root directory.
    pub fn new(root: Metadata) -> Tree {
        Tree {
            nodes: vec![Node {
                kind: Kind::Dir(BTreeMap::new()),
                meta: root,
            }],
        }
    }

    /// Adds a node that no directory references yet.
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        NodeId(self.nodes.len() - 1)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.0]
    }

    /// Number of nodes ever added (reachable or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn entries(&self, dir: NodeId) -> Result<&BTreeMap<Vec<u8>, NodeId>, TreeError> {
        match &self.nodes[dir.0].kind {
            Kind::Dir(entries) => Ok(entries),
            _ => Err(TreeError::NotADirectory),
        }
    }

    fn entries_mut(&mut self, dir: NodeId) -> Result<&mut BTreeMap<Vec<u8>, NodeId>, TreeError> {
        match &mut self.nodes[dir.0].kind {
            Kind::Dir(entries) => Ok(entries),
            _ => Err(TreeError::NotADirectory),
        }
    }

    /// The child `name` of `dir`, if any.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.entries(dir).ok()?.get(name).copied()
    }

    /// Names `child` as `name` in `dir`, replacing (and returning) what had
    /// that name.
    pub fn link(
        &mut self,
        dir: NodeId,
        name: &[u8],
        child: NodeId,
    ) -> Result<Option<NodeId>, TreeError> {
        check_name(name)?;
        Ok(self.entries_mut(dir)?.insert(name.to_vec(), child))
    }

    /// Removes `name` from `dir`, returning what it named.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) -> Result<Option<NodeId>, TreeError> {
        Ok(self.entries_mut(dir)?.remove(name))
    }

    /// Removes every entry of `dir` (an opaque directory in a layer).
    pub fn clear(&mut self, dir: NodeId) -> Result<(), TreeError> {
        self.entries_mut(dir)?.clear();
        Ok(())
    }

    /// Replaces every regular file's [`DataRef`] (once per node, so hard
    /// links stay one file) with what `f` returns for it: copying a tree's
    /// data from one image into another.
    pub fn map_files<E>(
        &mut self,
        mut f: impl FnMut(DataRef) -> Result<DataRef, E>,
    ) -> Result<(), E> {
        for node in &mut self.nodes {
            if let Kind::File(data) = &mut node.kind {
                *data = f(*data)?;
            }
        }
        Ok(())
    }

    /// Entries of `dir` in name (byte) order; empty for non-directories.
    pub fn children(&self, dir: NodeId) -> impl Iterator<Item = (&[u8], NodeId)> {
        self.entries(dir)
            .into_iter()
            .flatten()
            .map(|(name, id)| (name.as_slice(), *id))
    }
}

/// A single path component: not empty, `.`, `..`, nor containing `/` or
/// NUL, at most 255 bytes.
pub fn check_name(name: &[u8]) -> Result<(), TreeError> {
    if name.is_empty()
        || name == b"."
        || name == b".."
        || name.len() > 255
        || name.iter().any(|&b| b == b'/' || b == 0)
    {
        return Err(TreeError::BadName(
            String::from_utf8_lossy(name).into_owned(),
        ));
    }
    Ok(())
}
