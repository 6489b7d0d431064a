//! The gRPC `Admin` service: the consortium operator sets customers'
//! policies at run time. The set is one JSON value ([`PolicyOverlay`]) in
//! the shared store's global scope, changed with a compare-and-set (so two
//! notifier replicas never lose each other's change); every correlator
//! reads it on its refresh interval and lays it over its policies file.
//! Only the operator identity may call it; a policy is validated exactly as
//! the correlator validates its file before anything is stored.

use std::sync::Arc;

use tollguard_core::rules::config::{
    OverlayReadError, POLICY_OVERLAY, PolicyEntry, PolicyFile, PolicyOverlay,
};
use tollguard_core::rules::{Policies, Policy};
use tollguard_core::store::{Scope, StateWrite, WindowStore};
use tollguard_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::api::{Auth, Identity};

/// The overlay never expires (ten years).
const OVERLAY_TTL_MS: i64 = 10 * 365 * 86_400_000;
/// Compare-and-set attempts before giving up under contention.
const CAS_ATTEMPTS: usize = 20;
/// Largest number of operator-set policies.
pub const MAX_POLICIES: usize = 100_000;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct AdminService {
    auth: Auth,
    store: Arc<dyn WindowStore>,
}

fn to_entry(p: &pb::CustomerPolicy) -> PolicyEntry {
    PolicyEntry {
        customer_id: None,
        customer_token: Some(p.customer_token.trim().to_string()),
        daily_cap_eur: p.daily_cap_eur.clone(),
        hourly_cap_eur: p.hourly_cap_eur.clone(),
        channels: p.channels,
        blocked_ranges: p.blocked_ranges.clone(),
        allowed_ranges: p.allowed_ranges.clone(),
        business_hours: p.business_hours.clone(),
        business_days: p.business_days.clone(),
        time_zone: p.time_zone.clone(),
        label: p.label.clone(),
        peer_group: p.peer_group.clone(),
    }
}

fn to_proto(e: &PolicyEntry) -> pb::CustomerPolicy {
    pb::CustomerPolicy {
        customer_token: e.customer_token.clone().unwrap_or_default(),
        daily_cap_eur: e.daily_cap_eur.clone(),
        hourly_cap_eur: e.hourly_cap_eur.clone(),
        channels: e.channels,
        blocked_ranges: e.blocked_ranges.clone(),
        allowed_ranges: e.allowed_ranges.clone(),
        business_hours: e.business_hours.clone(),
        business_days: e.business_days.clone(),
        time_zone: e.time_zone.clone(),
        label: e.label.clone(),
        peer_group: e.peer_group.clone(),
    }
}

/// A token as the pseudonymiser writes it: `keyid:` and 16-64 hex digits.
fn check_token(t: &str) -> Result<(), Status> {
    let ok = t.split_once(':').is_some_and(|(id, hex)| {
        !id.is_empty()
            && id.len() <= 32
            && id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            && (16..=64).contains(&hex.len())
            && hex.bytes().all(|c| c.is_ascii_hexdigit())
    });
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "policy.customer_token: must be `keyid:hex` as printed by `tollguard pseudonymize customer <id>`",
        ))
    }
}

/// Validates one entry as the correlator would (the defaults only fill
/// absent fields, so any positive values do for validation).
fn validate(e: &PolicyEntry) -> Result<(), Status> {
    let defaults = Policy {
        daily_cap: 1,
        hourly_cap: 1,
        channels: 1,
        ..Default::default()
    };
    let file = PolicyFile {
        policy: vec![e.clone()],
    };
    Policies::resolve(&file, None, &defaults)
        .map(|_| ())
        .map_err(|err| {
            let field = err.key.replace("policy[0]", "policy");
            Status::invalid_argument(format!("{field}: {}", err.reason))
        })
}

impl AdminService {
    /// A service authorising callers with `auth` and storing in `store`.
    pub fn new(auth: Auth, store: Arc<dyn WindowStore>) -> Self {
        Self { auth, store }
    }

    /// The tonic server.
    pub fn into_server(self) -> pb::admin_server::AdminServer<Self> {
        pb::admin_server::AdminServer::new(self)
    }

    fn operator<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.auth.identify(req)? {
            Identity::Operator => Ok(()),
            Identity::Carrier(p) => {
                tracing::warn!(caller = %p, "Admin call by a carrier refused");
                Err(Status::permission_denied(
                    "the Admin API is for the consortium operator only",
                ))
            }
        }
    }

    async fn read(&self) -> Result<(Option<String>, PolicyOverlay), Status> {
        PolicyOverlay::read(&*self.store)
            .await
            .map_err(|e| match e {
                OverlayReadError::Store(_) => Status::unavailable(e.to_string()),
                OverlayReadError::Decode(_) => Status::internal(e.to_string()),
            })
    }

    /// Applies `change` to the overlay with compare-and-set retries;
    /// returns the new overlay.
    async fn modify<F>(&self, mut change: F) -> Result<PolicyOverlay, Status>
    where
        F: FnMut(&mut PolicyOverlay) -> Result<(), Status>,
    {
        for _ in 0..CAS_ATTEMPTS {
            let (raw, mut overlay) = self.read().await?;
            change(&mut overlay)?;
            overlay.revision += 1;
            let value = serde_json::to_string(&overlay)
                .map_err(|e| Status::internal(format!("cannot encode the overlay: {e}")))?;
            let written = self
                .store
                .cas_state(&StateWrite {
                    scope: Scope::Global,
                    name: POLICY_OVERLAY.to_string(),
                    expect: raw,
                    value,
                    ttl_ms: OVERLAY_TTL_MS,
                })
                .await
                .map_err(|e| Status::unavailable(format!("policy store unavailable: {e}")))?;
            if written {
                return Ok(overlay);
            }
        }
        Err(Status::aborted(
            "the policy set changed concurrently too often; retry",
        ))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        self.operator(&request)?;
        let p = request
            .into_inner()
            .policy
            .ok_or_else(|| Status::invalid_argument("policy: is required"))?;
        check_token(p.customer_token.trim())?;
        let entry = to_entry(&p);
        validate(&entry)?;
        let token = entry.customer_token.clone().unwrap_or_default();
        let stored = entry.clone();
        let overlay = self
            .modify(|o| {
                o.policy
                    .retain(|e| e.customer_token.as_deref() != Some(&token));
                if o.policy.len() >= MAX_POLICIES {
                    return Err(Status::resource_exhausted(format!(
                        "at most {MAX_POLICIES} operator-set policies"
                    )));
                }
                o.policy.push(stored.clone());
                o.policy
                    .sort_by(|a, b| a.customer_token.cmp(&b.customer_token));
                Ok(())
            })
            .await?;
        tracing::info!(customer = %token, revision = overlay.revision, "policy set by the operator");
        Ok(Response::new(pb::SetPolicyResponse {
            policy: Some(to_proto(&entry)),
            revision: overlay.revision,
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        self.operator(&request)?;
        let token = request.into_inner().customer_token.trim().to_string();
        check_token(&token)
            .map_err(|_| Status::invalid_argument("customer_token: must be `keyid:hex`"))?;
        let overlay = self
            .modify(|o| {
                let before = o.policy.len();
                o.policy
                    .retain(|e| e.customer_token.as_deref() != Some(&token));
                if o.policy.len() == before {
                    return Err(Status::not_found(format!(
                        "customer_token: {token} has no operator-set policy"
                    )));
                }
                Ok(())
            })
            .await?;
        tracing::info!(customer = %token, revision = overlay.revision, "policy removed by the operator");
        Ok(Response::new(pb::DeletePolicyResponse {
            revision: overlay.revision,
        }))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.operator(&request)?;
        let (_, overlay) = self.read().await?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: overlay.policy.iter().map(to_proto).collect(),
            revision: overlay.revision,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        assert!(check_token("k1:0123456789abcdef0123").is_ok());
        for bad in ["", "k1", "k1:xyz", ":0123456789abcdef", "k1:0123"] {
            assert!(check_token(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let mut e = to_entry(&pb::CustomerPolicy {
            customer_token: "k1:0123456789abcdef0123".into(),
            channels: Some(0),
            ..Default::default()
        });
        let st = validate(&e).unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        assert!(
            st.message().starts_with("policy.channels:"),
            "{}",
            st.message()
        );
        e.channels = Some(4);
        e.business_hours = Some("18:00-08:00".into());
        let st = validate(&e).unwrap_err();
        assert!(
            st.message().starts_with("policy.business_hours:"),
            "{}",
            st.message()
        );
        e.business_hours = None;
        e.peer_group = Some("call centre!".into());
        let st = validate(&e).unwrap_err();
        assert!(
            st.message().starts_with("policy.peer_group:"),
            "{}",
            st.message()
        );
        e.peer_group = Some("call_centre".into());
        assert!(validate(&e).is_ok());
    }
}
