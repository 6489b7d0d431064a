//! The operator's run-time policies (set through the notifier's `Admin`
//! API) laid over the policies file: read from the shared store's global
//! scope on the refresh interval, resolved and validated like the file, and
//! applied only when their revision changed. An unreadable or invalid
//! overlay keeps the policies in force (and is logged), never stops the
//! correlator.

use tollguard_core::rules::config::{OverlayReadError, PolicyFile, PolicyOverlay};
use tollguard_core::rules::{Policies, Policy};
use tollguard_core::store::WindowStore;

/// Why the overlay could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// It could not be read.
    #[error(transparent)]
    Read(#[from] OverlayReadError),
    /// An entry is invalid.
    #[error("policy overlay entry {key}: {reason}")]
    Invalid {
        /// The entry's field.
        key: String,
        /// Why.
        reason: String,
    },
}

/// Reads the overlay: `None` when the operator never set a policy, else its
/// revision and resolved policies.
pub async fn load(
    store: &dyn WindowStore,
    defaults: &Policy,
) -> Result<Option<(u64, Policies)>, OverlayError> {
    let (raw, o) = PolicyOverlay::read(store).await?;
    if raw.is_none() {
        return Ok(None);
    }
    let file = PolicyFile { policy: o.policy };
    let p = Policies::resolve(&file, None, defaults).map_err(|e| OverlayError::Invalid {
        key: e.key,
        reason: e.reason,
    })?;
    Ok(Some((o.revision, p)))
}

/// The policies file plus the overlay last applied.
#[derive(Debug, Clone, Default)]
pub struct Layered {
    file: Policies,
    defaults: Policy,
    revision: Option<u64>,
    overlay: Policies,
}

impl Layered {
    /// The file's policies with `defaults` for absent fields.
    pub fn new(file: Policies, defaults: Policy) -> Self {
        Self {
            file,
            defaults,
            revision: None,
            overlay: Policies::default(),
        }
    }

    /// A reloaded file (SIGHUP): the overlay stays on top.
    pub fn set_file(&mut self, file: Policies, defaults: Policy) -> Policies {
        self.file = file;
        self.defaults = defaults;
        self.current()
    }

    /// The policies in force.
    pub fn current(&self) -> Policies {
        self.file.merged(&self.overlay)
    }

    /// Re-reads the overlay; returns the new policies if they changed.
    pub async fn refresh(
        &mut self,
        store: &dyn WindowStore,
    ) -> Result<Option<Policies>, OverlayError> {
        match load(store, &self.defaults).await? {
            Some((rev, p)) if self.revision != Some(rev) => {
                tracing::info!(revision = rev, "operator policy overlay applied");
                self.revision = Some(rev);
                self.overlay = p;
                Ok(Some(self.current()))
            }
            None if self.revision.is_some() => {
                self.revision = None;
                self.overlay = Policies::default();
                Ok(Some(self.current()))
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollguard_core::rules::config::POLICY_OVERLAY;
    use tollguard_core::rules::config::PolicyEntry;
    use tollguard_core::store::{MemoryStore, Scope, StateWrite};

    fn tok(t: &str) -> tollguard_core::model::Token {
        let (k, v) = t.split_once(':').unwrap();
        tollguard_core::model::Token {
            key_id: k.into(),
            value: v.into(),
        }
    }

    fn entry(token: &str, channels: i64) -> PolicyEntry {
        PolicyEntry {
            customer_token: Some(token.into()),
            channels: Some(channels),
            ..Default::default()
        }
    }

    async fn put(store: &MemoryStore, prev: Option<String>, o: &PolicyOverlay) -> String {
        let v = serde_json::to_string(o).unwrap();
        assert!(
            store
                .cas_state(&StateWrite {
                    scope: Scope::Global,
                    name: POLICY_OVERLAY.into(),
                    expect: prev,
                    value: v.clone(),
                    ttl_ms: 86_400_000,
                })
                .await
                .unwrap()
        );
        v
    }

    #[tokio::test]
    async fn the_overlay_replaces_file_entries_and_applies_once_per_revision() {
        let defaults = Policy {
            daily_cap: 1,
            hourly_cap: 1,
            channels: 30,
            ..Default::default()
        };
        let file = Policies::resolve(
            &PolicyFile {
                policy: vec![entry("k1:aa", 5), entry("k1:bb", 6)],
            },
            None,
            &defaults,
        )
        .unwrap();
        let mut l = Layered::new(file, defaults);
        let store = MemoryStore::new("tg:");
        assert!(
            l.refresh(&store).await.unwrap().is_none(),
            "nothing set yet"
        );
        let v = put(
            &store,
            None,
            &PolicyOverlay {
                revision: 1,
                policy: vec![entry("k1:bb", 60), entry("k1:cc", 7)],
            },
        )
        .await;
        let p = l.refresh(&store).await.unwrap().expect("changed");
        assert_eq!(p.len(), 3);
        let by = |t: &str| p.get(&tok(t)).map(|x| x.channels);
        assert_eq!(
            (by("k1:aa"), by("k1:bb"), by("k1:cc")),
            (Some(5), Some(60), Some(7))
        );
        assert!(l.refresh(&store).await.unwrap().is_none(), "same revision");
        // An invalid overlay is refused and the policies in force stay.
        put(
            &store,
            Some(v),
            &PolicyOverlay {
                revision: 2,
                policy: vec![entry("k1:bb", 0)],
            },
        )
        .await;
        let e = l.refresh(&store).await.unwrap_err();
        assert!(e.to_string().contains("policy[0].channels"), "{e}");
        assert_eq!(l.current().get(&tok("k1:bb")).map(|x| x.channels), Some(60));
    }
}
