//! The settings a reload (`SIGHUP`) replaces while the daemon serves: access rules, Envoy's
//! descriptor rules and the default request deadline. Every request reads the current ones; a
//! request in flight keeps the ones it started with.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::access::Access;
use crate::envoy::rules::Rules;

/// The live settings; shared by the services and the reloader.
#[derive(Debug)]
pub struct Live {
    access: ArcSwap<Access>,
    envoy: ArcSwap<Rules>,
    request_timeout_ms: AtomicU64,
}

impl Live {
    pub fn new(access: Access, envoy: Rules, request_timeout: Duration) -> Self {
        Self {
            access: ArcSwap::from_pointee(access),
            envoy: ArcSwap::from_pointee(envoy),
            request_timeout_ms: AtomicU64::new(millis(request_timeout)),
        }
    }

    pub fn access(&self) -> Arc<Access> {
        self.access.load_full()
    }

    pub fn envoy(&self) -> Arc<Rules> {
        self.envoy.load_full()
    }

    /// The deadline of a request that carries none of its own.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.load(Ordering::Relaxed))
    }

    /// Replaces them all at once (each request sees either the old or the new value of each).
    pub fn replace(&self, access: Access, envoy: Rules, request_timeout: Duration) {
        self.access.store(Arc::new(access));
        self.envoy.store(Arc::new(envoy));
        self.request_timeout_ms
            .store(millis(request_timeout), Ordering::Relaxed);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
