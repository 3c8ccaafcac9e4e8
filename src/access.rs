//! Which callers may use which namespaces, and who may change them, decided from the Unix peer
//! credentials of the socket.
//!
//! With no rules, every caller that can open the socket (its mode is 0660 by default) may use
//! every configured namespace, and only the daemon's own uid and root may change entities, limits
//! and namespaces. With rules, a caller may use the namespaces of every rule that matches its uid
//! or gid, and may change them where such a rule says `admin = true`; a rule naming neither uid
//! nor gid matches everyone (TCP callers too, who have no credentials).

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
    /// Whether the rule also grants the changing calls of the Admin service (entities, limits,
    /// namespaces) in its namespaces.
    #[serde(default)]
    pub admin: bool,
}

/// The calling process, as the socket reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caller {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The TCP peer (address and port), for callers on the loopback listener.
    pub addr: Option<std::net::SocketAddr>,
}

/// Who may use a lease: the uid that opened it over the Unix socket, or the TCP connection that
/// opened it (a loopback caller has no credentials; its port names its connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Owner {
    Uid(u32),
    Connection(std::net::SocketAddr),
    /// Opened by the daemon itself (Envoy's descriptors, tests): no gRPC caller may use it.
    InProcess,
    /// A caller the daemon cannot identify: owns nothing.
    Unknown,
}

impl Owner {
    /// Whether `caller` may use a lease this owner opened.
    pub fn admits(self, caller: Caller) -> bool {
        self != Self::InProcess && self != Self::Unknown && self == caller.owner()
    }
}

impl Caller {
    /// The owner of the leases this caller opens.
    pub fn owner(self) -> Owner {
        match (self.uid, self.addr) {
            (Some(uid), _) => Owner::Uid(uid),
            (None, Some(addr)) => Owner::Connection(addr),
            (None, None) => Owner::Unknown,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.gid, self.addr) {
            (Some(uid), Some(gid), _) => write!(f, "uid {uid} (gid {gid})"),
            (_, _, Some(addr)) => write!(f, "TCP caller {addr}"),
            _ => f.write_str("a caller without peer credentials"),
        }
    }
}

/// The access policy.
#[derive(Debug, Clone, Default)]
pub struct Access {
    rules: Vec<AccessRule>,
    /// The daemon's own uid: with no rules, it (and root) may change.
    daemon_uid: u32,
}

impl Access {
    /// The policy of `rules` for a daemon running as the current effective uid.
    pub fn new(rules: Vec<AccessRule>) -> Self {
        Self::for_daemon_uid(rules, effective_uid())
    }

    pub fn for_daemon_uid(rules: Vec<AccessRule>, daemon_uid: u32) -> Self {
        Self { rules, daemon_uid }
    }

    /// Whether `caller` may use `namespace`.
    pub fn allows(&self, caller: Caller, namespace: &Namespace) -> bool {
        self.rules.is_empty() || self.granted(caller, namespace, false)
    }

    /// Whether `caller` may change entities, limits or the registration of `namespace`.
    pub fn may_change(&self, caller: Caller, namespace: &Namespace) -> bool {
        if self.rules.is_empty() {
            return caller.uid == Some(self.daemon_uid) || caller.uid == Some(0);
        }
        self.granted(caller, namespace, true)
    }

    fn granted(&self, caller: Caller, namespace: &Namespace, admin: bool) -> bool {
        self.rules.iter().any(|r| {
            let matches = match (r.uid, r.gid) {
                (None, None) => true,
                (uid, gid) => {
                    (uid.is_some() && uid == caller.uid) || (gid.is_some() && gid == caller.gid)
                }
            };
            matches
                && (r.admin || !admin)
                && r.namespaces
                    .iter()
                    .any(|n| n == "*" || n == namespace.as_str())
        })
    }
}

/// The daemon's effective uid.
pub fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(s: &str) -> Namespace {
        Namespace::new(s).unwrap()
    }

    #[test]
    fn changes_need_the_daemons_uid_root_or_an_admin_rule() {
        let who = |uid| Caller {
            uid: Some(uid),
            gid: Some(uid),
            addr: None,
        };
        let tcp = Caller {
            addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 5000))),
            ..Caller::default()
        };
        let open = Access::for_daemon_uid(vec![], 500);
        assert!(open.may_change(who(500), &ns("a")));
        assert!(open.may_change(who(0), &ns("a")));
        assert!(
            !open.may_change(who(501), &ns("a")),
            "any worker may use, not change"
        );
        assert!(open.allows(who(501), &ns("a")));
        assert!(!open.may_change(tcp, &ns("a")));
        let rule = |uid, admin, namespaces: &[&str]| AccessRule {
            uid: Some(uid),
            gid: None,
            namespaces: namespaces.iter().map(|n| (*n).to_owned()).collect(),
            admin,
        };
        let ruled =
            Access::for_daemon_uid(vec![rule(501, true, &["a"]), rule(502, false, &["*"])], 500);
        assert!(ruled.may_change(who(501), &ns("a")));
        assert!(
            !ruled.may_change(who(501), &ns("b")),
            "admin only where granted"
        );
        assert!(!ruled.may_change(who(502), &ns("a")), "use is not change");
        assert!(ruled.allows(who(502), &ns("a")));
        assert!(
            !ruled.may_change(who(500), &ns("a")),
            "rules replace the default"
        );
    }

    #[test]
    fn a_lease_belongs_to_the_uid_or_connection_that_opened_it() {
        let uid = |u| Caller {
            uid: Some(u),
            gid: Some(u),
            addr: None,
        };
        let conn = |port| Caller {
            addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            ..Caller::default()
        };
        assert!(uid(7).owner().admits(uid(7)));
        assert!(!uid(7).owner().admits(uid(8)));
        assert!(conn(1).owner().admits(conn(1)));
        assert!(!conn(1).owner().admits(conn(2)));
        assert!(!Owner::InProcess.admits(uid(0)));
        assert!(!Caller::default().owner().admits(Caller::default()));
    }

    #[test]
    fn rules_grant_by_uid_gid_or_to_everyone() {
        let me = Caller {
            uid: Some(1000),
            gid: Some(100),
            addr: None,
        };
        let tcp = Caller::default();
        assert!(Access::default().allows(me, &ns("any")), "no rules: open");
        let access = Access::new(vec![
            AccessRule {
                uid: Some(1000),
                gid: None,
                namespaces: vec!["alpha".into()],
                admin: false,
            },
            AccessRule {
                uid: None,
                gid: Some(100),
                namespaces: vec!["beta".into()],
                admin: false,
            },
            AccessRule {
                uid: Some(0),
                gid: None,
                namespaces: vec!["*".into()],
                admin: false,
            },
            AccessRule {
                uid: None,
                gid: None,
                namespaces: vec!["public".into()],
                admin: false,
            },
        ]);
        assert!(access.allows(me, &ns("alpha")));
        assert!(access.allows(me, &ns("beta")));
        assert!(access.allows(me, &ns("public")));
        assert!(!access.allows(me, &ns("gamma")));
        assert!(access.allows(
            Caller {
                uid: Some(0),
                gid: Some(0),
                addr: None,
            },
            &ns("gamma")
        ));
        assert!(access.allows(tcp, &ns("public")));
        assert!(!access.allows(tcp, &ns("alpha")));
    }
}
