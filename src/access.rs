//! Which callers may use which namespaces, decided from the Unix peer credentials of the socket.
//!
//! With no rules, every caller that can open the socket (its mode is 0660) may use every
//! configured namespace. With rules, a caller may use the namespaces of every rule that matches its
//! uid or gid; a rule naming neither matches everyone (TCP callers too, who have no credentials).

use serde::Deserialize;

use crate::domain::ids::Namespace;

/// One `[[access]]` rule of the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Namespaces granted; `"*"` grants all.
    pub namespaces: Vec<String>,
}

/// The calling process, as the socket reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caller {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.gid) {
            (Some(uid), Some(gid)) => write!(f, "uid {uid} (gid {gid})"),
            _ => f.write_str("a caller without peer credentials"),
        }
    }
}

/// The access policy.
#[derive(Debug, Clone, Default)]
pub struct Access {
    rules: Vec<AccessRule>,
}

impl Access {
    pub fn new(rules: Vec<AccessRule>) -> Self {
        Self { rules }
    }

    /// Whether `caller` may use `namespace`.
    pub fn allows(&self, caller: Caller, namespace: &Namespace) -> bool {
        self.rules.is_empty()
            || self.rules.iter().any(|r| {
                let matches = match (r.uid, r.gid) {
                    (None, None) => true,
                    (uid, gid) => {
                        (uid.is_some() && uid == caller.uid) || (gid.is_some() && gid == caller.gid)
                    }
                };
                matches
                    && r.namespaces
                        .iter()
                        .any(|n| n == "*" || n == namespace.as_str())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> Namespace {
        Namespace::new(s).unwrap()
    }

    #[test]
    fn rules_grant_by_uid_gid_or_to_everyone() {
        let me = Caller {
            uid: Some(1000),
            gid: Some(100),
        };
        let tcp = Caller::default();
        assert!(Access::default().allows(me, &ns("any")), "no rules: open");
        let access = Access::new(vec![
            AccessRule {
                uid: Some(1000),
                gid: None,
                namespaces: vec!["alpha".into()],
            },
            AccessRule {
                uid: None,
                gid: Some(100),
                namespaces: vec!["beta".into()],
            },
            AccessRule {
                uid: Some(0),
                gid: None,
                namespaces: vec!["*".into()],
            },
            AccessRule {
                uid: None,
                gid: None,
                namespaces: vec!["public".into()],
            },
        ]);
        assert!(access.allows(me, &ns("alpha")));
        assert!(access.allows(me, &ns("beta")));
        assert!(access.allows(me, &ns("public")));
        assert!(!access.allows(me, &ns("gamma")));
        assert!(access.allows(
            Caller {
                uid: Some(0),
                gid: Some(0)
            },
            &ns("gamma")
        ));
        assert!(access.allows(tcp, &ns("public")));
        assert!(!access.allows(tcp, &ns("alpha")));
    }
}
