//! A command's environment and program lookup: pure rules, so that the
//! exact errors the host sees are testable.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Environment variables in order, as (name, value).
pub type Env = Vec<(Vec<u8>, Vec<u8>)>;

/// The defaults (`PATH`, `HOME`, `TERM`) overridden by `entries`, each a
/// `KEY=VALUE`; a later entry for a key replaces an earlier one in place.
pub fn build(home: &[u8], entries: &[impl AsRef<[u8]>]) -> Result<Env, String> {
    let mut env: Env = vec![
        (b"PATH".to_vec(), DEFAULT_PATH.to_vec()),
        (b"HOME".to_vec(), home.to_vec()),
        (b"TERM".to_vec(), b"xterm".to_vec()),
    ];
    for entry in entries {
        let entry = entry.as_ref();
        let invalid = || {
            format!(
                "invalid environment entry {:?}",
                String::from_utf8_lossy(entry)
            )
        };
        let eq = entry.iter().position(|&b| b == b'=').ok_or_else(invalid)?;
        if eq == 0 || entry.contains(&0) {
            return Err(invalid());
        }
        let (key, value) = (&entry[..eq], &entry[eq + 1..]);
        match env.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_vec(),
            None => env.push((key.to_vec(), value.to_vec())),
        }
    }
    Ok(env)
}

pub fn get<'a>(env: &'a Env, key: &[u8]) -> Option<&'a [u8]> {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

/// What is at a candidate path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Missing,
    NotExecutable,
    Executable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchError {
    NotFound,
    /// Only non-executable files of that name exist; the first is given.
    NotExecutable(PathBuf),
}

/// Finds `name` (which has no `/`) in the directories of `path`, like
/// execvp: the first executable wins, and if only non-executable files
/// match, that is a permission error rather than "not found". Relative
/// directories (an empty one is `.`) are taken relative to `cwd`.
pub fn search(
    name: &[u8],
    path: &[u8],
    cwd: &Path,
    probe: impl Fn(&Path) -> Probe,
) -> Result<PathBuf, SearchError> {
    let mut denied = None;
    for dir in path.split(|&b| b == b':') {
        let candidate = cwd
            .join(OsStr::from_bytes(dir))
            .join(OsStr::from_bytes(name));
        match probe(&candidate) {
            Probe::Executable => return Ok(candidate),
            Probe::NotExecutable => {
                denied.get_or_insert(candidate);
            }
            Probe::Missing => {}
        }
    }
    Err(denied.map_or(SearchError::NotFound, SearchError::NotExecutable))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_overridden_in_place_and_extended() {
        let env = build(b"/home/a", &[&b"TERM=dumb"[..], b"X=1=2", b"X=3", b"E="]).unwrap();
        let text: Vec<String> = env
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(k),
                    String::from_utf8_lossy(v)
                )
            })
            .collect();
        assert_eq!(
            text,
            [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/home/a",
                "TERM=dumb",
                "X=3",
                "E=",
            ]
        );
        assert_eq!(get(&env, b"HOME"), Some(&b"/home/a"[..]));
        assert_eq!(get(&env, b"NOPE"), None);
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in [&b"NOEQUALS"[..], b"=x", b"A=\0"] {
            assert!(build(b"/", &[bad]).is_err());
        }
        assert_eq!(
            build(b"/", &[b"FOO"]).unwrap_err(),
            "invalid environment entry \"FOO\""
        );
    }

    fn probe(path: &Path) -> Probe {
        let is = |list: &[&str]| list.iter().any(|p| path == Path::new(p));
        if is(&["/bin/ls", "/usr/bin/ls", "/work/tool"]) {
            Probe::Executable
        } else if is(&["/usr/local/bin/ls", "/usr/local/bin/data", "/bin/data"]) {
            Probe::NotExecutable
        } else {
            Probe::Missing
        }
    }

    #[test]
    fn search_takes_the_first_executable() {
        let cwd = Path::new("/work");
        let path = b"/usr/local/bin:/usr/bin:/bin";
        assert_eq!(search(b"ls", path, cwd, probe), Ok("/usr/bin/ls".into()));
        assert_eq!(
            search(b"data", path, cwd, probe),
            Err(SearchError::NotExecutable("/usr/local/bin/data".into()))
        );
        assert_eq!(
            search(b"nope", path, cwd, probe),
            Err(SearchError::NotFound)
        );
        assert_eq!(search(b"ls", b"", cwd, probe), Err(SearchError::NotFound));
    }

    #[test]
    fn relative_and_empty_path_entries_are_under_cwd() {
        let cwd = Path::new("/work");
        assert_eq!(
            search(b"tool", b"/bin:", cwd, probe),
            Ok("/work/./tool".into())
        );
        assert_eq!(search(b"tool", b".", cwd, probe), Ok("/work/./tool".into()));
    }
}
