//! Glob patterns on absolute guest paths, for leaving paths out of a
//! snapshot.
//!
//! `*` matches any run of characters within one path component, `?` one
//! character, and a component that is exactly `**` any number of components
//! (zero included). Everything else is literal. A pattern starting with `/`
//! is anchored at the root; any other pattern may match at any depth, as if
//! it started with `/**/`. Matching is by whole components, so `/var/cache`
//! does not match `/var/cache2`.
//!
//! Paths are bytes; a component that is not UTF-8 is compared as its lossy
//! decoding, so `?` and `*` still match its odd bytes.

/// One component of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// `**`: any number of components.
    Any,
    /// A component pattern with `*` and `?`.
    Name(Vec<char>),
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    parts: Vec<Part>,
}

impl Glob {
    /// Compiles `pattern`. An empty pattern is refused: it would otherwise
    /// match every path.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        if !pattern.starts_with('/') {
            parts.push(Part::Any);
        }
        parts.extend(
            pattern
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(|c| match c {
                    "**" => Part::Any,
                    _ => Part::Name(c.chars().collect()),
                }),
        );
        if pattern.trim().is_empty() {
            return Err("empty exclude pattern".into());
        }
        Ok(Self { parts })
    }

    /// Whether absolute path `path` matches.
    pub fn matches(&self, path: &[u8]) -> bool {
        let names: Vec<Vec<char>> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .map(|c| String::from_utf8_lossy(c).chars().collect())
            .collect();
        // matched[i][j]: parts[i..] match names[j..]. Filled from the end, so
        // each `**` costs one pass instead of a backtracking search.
        let (np, nn) = (self.parts.len(), names.len());
        let mut matched = vec![vec![false; nn + 1]; np + 1];
        matched[np][nn] = true;
        for i in (0..np).rev() {
            for j in (0..=nn).rev() {
                matched[i][j] = match &self.parts[i] {
                    Part::Any => matched[i + 1][j] || (j < nn && matched[i][j + 1]),
                    Part::Name(p) => j < nn && matched[i + 1][j + 1] && component(p, &names[j]),
                };
            }
        }
        matched[0][0]
    }
}

/// Whether one component `name` matches `pattern` (`*`, `?`, literals).
fn component(pattern: &[char], name: &[char]) -> bool {
    let (mut p, mut n) = (0, 0);
    // Where to resume after the last `*`: (pattern index, name index).
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p + 1, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry.
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    p = sp;
                    n = sn + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Glob::new(pattern).unwrap().matches(path.as_bytes())
    }

    #[test]
    fn components_match_with_star_and_question_mark() {
        let c = |p: &str, n: &str| {
            component(
                &p.chars().collect::<Vec<_>>(),
                &n.chars().collect::<Vec<_>>(),
            )
        };
        assert!(c("abc", "abc"));
        assert!(!c("abc", "abd"));
        assert!(!c("abc", "abcd"));
        assert!(c("*", ""));
        assert!(c("*", "anything"));
        assert!(c("*.log", "x.log"));
        assert!(c("*.log", ".log"));
        assert!(!c("*.log", "x.log.1"));
        assert!(c("a*b*c", "axxbyybzc"));
        assert!(!c("a*b*c", "axxbyyb"));
        assert!(c("?", "é"));
        assert!(!c("?", ""));
        assert!(!c("?", "ab"));
        assert!(c("??*", "ab"));
        assert!(c("**", "x"));
        assert!(c("*a*a*a*a*a*b", &"a".repeat(30).replace("aa", "ab")));
    }

    #[test]
    fn anchored_patterns_match_from_the_root() {
        assert!(m("/tmp", "/tmp"));
        assert!(!m("/tmp", "/var/tmp"));
        assert!(!m("/tmp", "/tmp2"));
        assert!(!m("/tmp", "/tmp/x"));
        assert!(m("/var/cache/*", "/var/cache/apt"));
        assert!(!m("/var/cache/*", "/var/cache"));
        assert!(!m("/var/cache/*", "/var/cache/apt/archives"));
        assert!(m("/etc/host?ame", "/etc/hostname"));
        assert!(m("/", "/"));
        assert!(!m("/", "/etc"));
    }

    #[test]
    fn double_star_spans_any_number_of_components() {
        assert!(m("/tmp/**", "/tmp/a"));
        assert!(m("/tmp/**", "/tmp/a/b/c"));
        // Zero components: the directory itself.
        assert!(m("/tmp/**", "/tmp"));
        assert!(!m("/tmp/**", "/var/tmp/a"));
        assert!(m("/a/**/b", "/a/b"));
        assert!(m("/a/**/b", "/a/x/y/b"));
        assert!(!m("/a/**/b", "/a/x/y/b/c"));
        assert!(m("/a/**/b/**", "/a/x/b/y/z"));
        assert!(m("/**/*.o", "/src/lib/x.o"));
        assert!(m("/**", "/anything/at/all"));
        assert!(m("/a/**/**/b", "/a/b"));
    }

    #[test]
    fn unanchored_patterns_match_at_any_depth() {
        assert!(m("*.log", "/x.log"));
        assert!(m("*.log", "/var/log/app/x.log"));
        assert!(!m("*.log", "/var/log/x.log.1"));
        assert!(m("cache/*", "/home/u/cache/x"));
        assert!(m("cache/*", "/cache/x"));
        assert!(!m("cache/*", "/home/u/mycache/x"));
        assert!(m("node_modules", "/app/node_modules"));
        assert!(m("tmp/", "/srv/tmp"));
    }

    #[test]
    fn exclusion_of_a_directory_is_decided_on_its_own_path() {
        // The walker skips a matching directory whole, so the pattern must
        // match the directory path itself.
        assert!(m("/var/cache", "/var/cache"));
        assert!(m("/var/cache/**", "/var/cache"));
        assert!(!m("/var/cache/*", "/var/cache"));
        assert!(m("__pycache__", "/usr/lib/python3/__pycache__"));
    }

    #[test]
    fn odd_bytes_and_dot_components() {
        assert!(Glob::new("/data/?").unwrap().matches(b"/data/\xff"));
        assert!(Glob::new("/data/*").unwrap().matches(b"/data/a\xffb"));
        assert!(!Glob::new("/data/ab").unwrap().matches(b"/data/a\xffb"));
        assert!(m("/./etc/./hostname", "/etc/hostname"));
        assert!(m("/etc//hostname", "/etc/hostname"));
    }

    #[test]
    fn empty_patterns_are_refused() {
        assert!(Glob::new("").is_err());
        assert!(Glob::new("  ").is_err());
    }
}
