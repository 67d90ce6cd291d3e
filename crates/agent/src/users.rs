//! Resolving a user spec (`name`, `uid`, `uid:gid`, `name:group`, ...) to
//! ids, from the contents of the root's `/etc/passwd` and `/etc/group`.
//!
//! Pure: callers read the files, so the rules are testable on any host.

use std::fmt;

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserError {
    UnknownUser(String),
    UnknownGroup(String),
    Invalid(String),
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserError::UnknownUser(name) => write!(f, "unknown user {name:?}"),
            UserError::UnknownGroup(name) => write!(f, "unknown group {name:?}"),
            UserError::Invalid(spec) => write!(f, "invalid user {spec:?}"),
        }
    }
}

struct Passwd<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct Group<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

/// A plain decimal id; signs and spaces make it a name.
fn numeric(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Entries of a colon-separated database, skipping comments and NIS
/// (`+`/`-`) lines.
fn records(file: &str) -> impl Iterator<Item = Vec<&str>> {
    file.lines()
        .filter(|l| !l.is_empty() && !l.starts_with(['#', '+', '-']))
        .map(|l| l.split(':').collect())
}

/// `name:password:uid:gid:gecos:home[:shell]`; malformed lines are skipped.
fn passwd_entries(file: &str) -> impl Iterator<Item = Passwd<'_>> {
    records(file).filter_map(|f| {
        Some(Passwd {
            name: f.first()?,
            uid: numeric(f.get(2)?)?,
            gid: numeric(f.get(3)?)?,
            home: f.get(5)?,
        })
    })
}

/// `name:password:gid[:members]`; malformed lines are skipped.
fn group_entries(file: &str) -> impl Iterator<Item = Group<'_>> {
    records(file).filter_map(|f| {
        Some(Group {
            name: f.first()?,
            gid: numeric(f.get(2)?)?,
            members: f.get(3).copied().unwrap_or(""),
        })
    })
}

fn home_or_root(home: Option<&str>) -> String {
    match home {
        Some(h) if !h.is_empty() => h.to_owned(),
        _ => "/".to_owned(),
    }
}

/// Resolves `spec`; `None` is root with no supplementary groups.
///
/// A numeric uid need not exist in `passwd`. The primary gid is, in order:
/// the one in `spec`, the user's `passwd` entry, else 0. Supplementary
/// groups are the primary gid plus every group listing the user's name.
pub fn resolve(spec: Option<&str>, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let Some(spec) = spec else {
        let root = passwd_entries(passwd).find(|p| p.uid == 0);
        return Ok(Identity {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            home: home_or_root(root.map(|p| p.home)),
        });
    };
    let (user, group_spec) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group_spec == Some("") {
        return Err(UserError::Invalid(spec.to_owned()));
    }
    let (uid, entry) = match numeric(user) {
        Some(uid) => (uid, passwd_entries(passwd).find(|p| p.uid == uid)),
        None => {
            let entry = passwd_entries(passwd)
                .find(|p| p.name == user)
                .ok_or_else(|| UserError::UnknownUser(user.to_owned()))?;
            (entry.uid, Some(entry))
        }
    };
    let gid = match group_spec {
        None => entry.as_ref().map_or(0, |p| p.gid),
        Some(g) => match numeric(g) {
            Some(gid) => gid,
            None => group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup(g.to_owned()))?,
        },
    };
    let mut groups = vec![gid];
    if let Some(name) = entry.as_ref().map(|p| p.name) {
        for g in group_entries(group) {
            if g.members.split(',').any(|m| m.trim() == name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home: home_or_root(entry.map(|p| p.home)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
# comment
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice,,,:/home/alice:/bin/sh
broken:x:notanumber:1::/:/bin/sh
nohome:x:1001:1001:::/bin/sh
+nis
";
    const GROUP: &str = "\
root:x:0:
daemon:x:1:
wheel:x:10:alice,bob
alice:x:1000:
audio:x:29:daemon, alice
staff:x:50
";

    fn id(spec: Option<&str>) -> Result<Identity, UserError> {
        resolve(spec, PASSWD, GROUP)
    }

    #[test]
    fn none_is_root_without_supplementary_groups() {
        assert_eq!(
            id(None).unwrap(),
            Identity {
                uid: 0,
                gid: 0,
                groups: vec![],
                home: "/root".into()
            }
        );
        assert_eq!(resolve(None, "", "").unwrap().home, "/");
    }

    #[test]
    fn name_takes_passwd_gid_home_and_memberships() {
        assert_eq!(
            id(Some("alice")).unwrap(),
            Identity {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 10, 29],
                home: "/home/alice".into()
            }
        );
    }

    #[test]
    fn numeric_uid_known_or_not() {
        assert_eq!(id(Some("1000")).unwrap(), id(Some("alice")).unwrap());
        assert_eq!(
            id(Some("4242")).unwrap(),
            Identity {
                uid: 4242,
                gid: 0,
                groups: vec![0],
                home: "/".into()
            }
        );
        assert_eq!(id(Some("1001")).unwrap().home, "/");
    }

    #[test]
    fn explicit_group_by_id_or_name() {
        let i = id(Some("alice:50")).unwrap();
        assert_eq!((i.uid, i.gid, i.groups), (1000, 50, vec![50, 10, 29]));
        let i = id(Some("4242:wheel")).unwrap();
        assert_eq!((i.uid, i.gid, i.groups), (4242, 10, vec![10]));
        let i = id(Some("daemon:alice")).unwrap();
        assert_eq!((i.uid, i.gid, i.groups), (1, 1000, vec![1000, 29]));
    }

    #[test]
    fn unknown_names_and_malformed_specs() {
        assert_eq!(
            id(Some("bob")).unwrap_err().to_string(),
            "unknown user \"bob\""
        );
        assert_eq!(
            id(Some("alice:x")).unwrap_err().to_string(),
            "unknown group \"x\""
        );
        assert_eq!(
            id(Some("broken")).unwrap_err(),
            UserError::UnknownUser("broken".into())
        );
        for spec in ["", ":1", "alice:", "+5"] {
            assert!(id(Some(spec)).is_err(), "{spec:?}");
        }
        assert_eq!(
            id(Some(":1")).unwrap_err().to_string(),
            "invalid user \":1\""
        );
    }
}
