//! Mutual TLS for the gRPC endpoints (`[tls]`): the server certificate and
//! key from files, a CA bundle that client certificates must chain to, and
//! the mapping of a client certificate's identity (a SAN DNS name, a SAN URI
//! or, failing those, the subject CN) to a *principal*: a provider id, or
//! `operator` for the consortium's operations role.
//!
//! Production requires TLS: without `tls.enabled = false` the service
//! refuses to start unless the certificate, key and client CA are given.
//! Plaintext is a development mode and is logged as such at start.
//!
//! At the TLS layer a client certificate is *optional* (so a caller without
//! one gets a clear `UNAUTHENTICATED` answer instead of a broken
//! connection), but any certificate presented must chain to the client CA or
//! the handshake fails. Every RPC then calls [`ClientAuth::authenticate`],
//! which refuses a call without a certificate (`UNAUTHENTICATED`) or with a
//! certificate that maps to no principal (`PERMISSION_DENIED`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tollguard_core::ConfigError;
use tonic::Status;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// The principal name of the consortium operator role.
pub const OPERATOR: &str = "operator";

/// `[tls]`: mutual TLS of a gRPC endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// `false` serves plaintext (development only, logged as a warning).
    /// Unset or `true`: mutual TLS, and the files below are required.
    pub enabled: Option<bool>,
    /// The server certificate chain (PEM).
    pub cert_file: Option<PathBuf>,
    /// The server private key (PEM); never logged.
    pub key_file: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
    /// Client certificate identity (SAN DNS name, SAN URI or subject CN) →
    /// principal (a provider id, or `operator`).
    pub clients: BTreeMap<String, String>,
    /// Time a client has to complete the TLS handshake, milliseconds.
    pub handshake_timeout_ms: u64,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            enabled: None,
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            clients: BTreeMap::new(),
            handshake_timeout_ms: 10_000,
        }
    }
}

/// How a gRPC endpoint is served.
#[derive(Debug, Clone)]
pub enum GrpcSecurity {
    /// Plaintext (development mode, `tls.enabled = false`).
    Plaintext,
    /// Mutual TLS with client identities.
    Mutual {
        /// The rustls server configuration for tonic.
        tls: ServerTlsConfig,
        /// Client certificate identity → principal.
        clients: ClientAuth,
    },
}

impl GrpcSecurity {
    /// Whether this is the plaintext development mode.
    pub fn is_plaintext(&self) -> bool {
        matches!(self, GrpcSecurity::Plaintext)
    }

    /// The client mapping (`None` in plaintext mode).
    pub fn clients(&self) -> Option<&ClientAuth> {
        match self {
            GrpcSecurity::Plaintext => None,
            GrpcSecurity::Mutual { clients, .. } => Some(clients),
        }
    }

    /// Applies the TLS configuration to a server builder.
    pub fn apply(&self, builder: Server) -> Result<Server, tonic::transport::Error> {
        match self {
            GrpcSecurity::Plaintext => Ok(builder),
            GrpcSecurity::Mutual { tls, .. } => builder.tls_config(tls.clone()),
        }
    }

    /// Logs how the endpoint is served; plaintext is a loud warning.
    pub fn log(&self, endpoint: &str) {
        match self {
            GrpcSecurity::Plaintext => tracing::warn!(
                endpoint,
                "INSECURE DEVELOPMENT MODE: tls.enabled = false, the gRPC endpoint is served in \
                 PLAINTEXT without client certificates; callers are not authenticated by \
                 certificate. Never expose this endpoint outside a development machine"
            ),
            GrpcSecurity::Mutual { clients, .. } => tracing::info!(
                endpoint,
                identities = clients.len(),
                "gRPC endpoint served with mutual TLS; callers identified by client certificate"
            ),
        }
    }
}

pub(crate) fn read_pem(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    // Errors name the file, never its content.
    std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))
}

pub(crate) fn certs(key: &str, path: &Path, pem: &[u8]) -> Result<usize, ConfigError> {
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(pem) {
        let c = c.map_err(|e| {
            ConfigError::new(
                key,
                format!(
                    "{} is not a valid PEM certificate file: {e}",
                    path.display()
                ),
            )
        })?;
        x509_parser::parse_x509_certificate(c.as_ref()).map_err(|e| {
            ConfigError::new(
                key,
                format!(
                    "{}: certificate {n} is not valid X.509: {e}",
                    path.display()
                ),
            )
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(ConfigError::new(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(n)
}

impl TlsSettings {
    /// Whether TLS was turned off explicitly.
    pub fn plaintext(&self) -> bool {
        self.enabled == Some(false)
    }

    /// Validates what can be checked without I/O. `principals` says which
    /// principals the service knows (returns an error text for others).
    pub fn validate(
        &self,
        principal_ok: impl Fn(&str) -> Result<(), String>,
    ) -> Result<(), ConfigError> {
        if self.plaintext() {
            return Ok(());
        }
        for (k, v) in [
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
            ("tls.client_ca_file", &self.client_ca_file),
        ] {
            if v.is_none() {
                return Err(ConfigError::new(
                    k,
                    "is required: gRPC endpoints are served with mutual TLS by default \
                     (set tls.enabled = false only for local development)",
                ));
            }
        }
        if self.clients.is_empty() {
            return Err(ConfigError::new(
                "tls.clients",
                "map at least one client certificate identity (SAN DNS name, SAN URI or CN) to a principal",
            ));
        }
        for (id, principal) in &self.clients {
            if id.trim().is_empty() || id.trim() != id || id.chars().any(char::is_control) {
                return Err(ConfigError::new(
                    "tls.clients",
                    format!(
                        "{id:?} is not a certificate identity (empty, padded or with control characters)"
                    ),
                ));
            }
            principal_ok(principal).map_err(|why| {
                ConfigError::new(format!("tls.clients.{id}"), format!("{principal:?}: {why}"))
            })?;
        }
        if !(100..=120_000).contains(&self.handshake_timeout_ms) {
            return Err(ConfigError::new(
                "tls.handshake_timeout_ms",
                "must be between 100 and 120000",
            ));
        }
        Ok(())
    }

    /// Loads the files (after [`TlsSettings::validate`]): the certificate
    /// and key must parse and match, the CA bundle must hold certificates.
    pub fn load(&self) -> Result<GrpcSecurity, ConfigError> {
        if self.plaintext() {
            return Ok(GrpcSecurity::Plaintext);
        }
        let need = |k: &str, v: &Option<PathBuf>| {
            v.clone().ok_or_else(|| ConfigError::new(k, "is required"))
        };
        let cert_path = need("tls.cert_file", &self.cert_file)?;
        let key_path = need("tls.key_file", &self.key_file)?;
        let ca_path = need("tls.client_ca_file", &self.client_ca_file)?;
        let cert = read_pem("tls.cert_file", &cert_path)?;
        certs("tls.cert_file", &cert_path, &cert)?;
        let key = read_pem("tls.key_file", &key_path)?;
        PrivateKeyDer::from_pem_slice(&key).map_err(|_| {
            ConfigError::new(
                "tls.key_file",
                format!("{} holds no PEM private key", key_path.display()),
            )
        })?;
        let ca = read_pem("tls.client_ca_file", &ca_path)?;
        certs("tls.client_ca_file", &ca_path, &ca)?;
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(true)
            .timeout(Duration::from_millis(self.handshake_timeout_ms));
        // Building the acceptor checks that the key matches the certificate.
        Server::builder().tls_config(tls.clone()).map_err(|e| {
            ConfigError::new(
                "tls.key_file",
                format!(
                    "the key {} does not fit the certificate {}: {e}",
                    key_path.display(),
                    cert_path.display()
                ),
            )
        })?;
        Ok(GrpcSecurity::Mutual {
            tls,
            clients: ClientAuth::new(self.clients.clone()),
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The certificate identity that matched (SAN or CN).
    pub identity: String,
    /// Its principal: a provider id or `operator`.
    pub principal: String,
}

/// Client certificate identity → principal.
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    clients: BTreeMap<String, String>,
}

/// The identities a certificate claims: SAN DNS names and URIs, then the
/// subject CNs. `None` if the certificate does not parse.
pub fn certificate_identities(der: &[u8]) -> Option<Vec<String>> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => out.push(d.to_string()),
                GeneralName::URI(u) => out.push(u.to_string()),
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            out.push(s.to_string());
        }
    }
    Some(out)
}

impl ClientAuth {
    /// From `tls.clients`.
    pub fn new(clients: BTreeMap<String, String>) -> Self {
        Self { clients }
    }

    /// Number of mapped identities.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The caller of a certificate chain (leaf first). A certificate whose
    /// identities map to two different principals is refused as ambiguous.
    pub fn resolve(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<Caller, Status> {
        let leaf = chain.and_then(|c| c.first()).ok_or_else(|| {
            Status::unauthenticated(
                "no client certificate: this endpoint requires mutual TLS with a certificate \
                 issued by the consortium CA",
            )
        })?;
        let ids = certificate_identities(leaf.as_ref())
            .ok_or_else(|| Status::unauthenticated("the client certificate does not parse"))?;
        let matched: Vec<(&String, &String)> = ids
            .iter()
            .filter_map(|i| self.clients.get_key_value(i.as_str()))
            .collect();
        let principals: BTreeSet<&String> = matched.iter().map(|(_, p)| *p).collect();
        match (matched.first(), principals.len()) {
            (Some((id, p)), 1) => Ok(Caller {
                identity: (*id).clone(),
                principal: (*p).clone(),
            }),
            (Some(_), _) => Err(Status::permission_denied(format!(
                "the client certificate names identities of several principals ({}); refused as ambiguous",
                principals
                    .into_iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            (None, _) => Err(Status::permission_denied(format!(
                "the client certificate identity ({}) is not mapped to any principal in tls.clients",
                if ids.is_empty() {
                    "none".to_string()
                } else {
                    ids.join(", ")
                }
            ))),
        }
    }

    /// The caller of a request served over mutual TLS.
    pub fn authenticate<T>(&self, req: &tonic::Request<T>) -> Result<Caller, Status> {
        let certs = req.peer_certs();
        self.resolve(certs.as_deref().map(Vec::as_slice))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        ca: rcgen::Certificate,
        ca_params: rcgen::CertificateParams,
        ca_key: rcgen::KeyPair,
    }

    impl Pki {
        fn new() -> Self {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "test CA");
            let ca = p.self_signed(&ca_key).unwrap();
            Self {
                ca,
                ca_params: p,
                ca_key,
            }
        }

        fn leaf(&self, sans: &[&str], cn: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(
                sans.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
            (p.signed_by(&key, &issuer).unwrap(), key)
        }
    }

    fn auth(pairs: &[(&str, &str)]) -> ClientAuth {
        ClientAuth::new(
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    #[test]
    fn identities_come_from_sans_then_cn() {
        let pki = Pki::new();
        let (c, _) = pki.leaf(&["ingest.kpn.example"], "KPN ingest client");
        let a = auth(&[("ingest.kpn.example", "kpn"), ("KPN ingest client", "kpn")]);
        let who = a.resolve(Some(&[c.der().clone()])).unwrap();
        assert_eq!(who.principal, "kpn");
        assert_eq!(who.identity, "ingest.kpn.example");
        // CN only.
        let (c, _) = pki.leaf(&[], "ops-console");
        let who = auth(&[("ops-console", OPERATOR)])
            .resolve(Some(&[c.der().clone()]))
            .unwrap();
        assert_eq!(who.principal, OPERATOR);
    }

    #[test]
    fn missing_unmapped_and_ambiguous_certificates_are_refused() {
        let pki = Pki::new();
        let a = auth(&[("a.example", "kpn"), ("b.example", "bt")]);
        assert_eq!(
            a.resolve(None).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let (c, _) = pki.leaf(&["c.example"], "c");
        let e = a.resolve(Some(&[c.der().clone()])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("c.example"), "{}", e.message());
        let (c, _) = pki.leaf(&["a.example", "b.example"], "x");
        let e = a.resolve(Some(&[c.der().clone()])).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("ambiguous"), "{}", e.message());
    }

    #[test]
    fn settings_require_files_unless_disabled_and_load_them() {
        let ok = |_: &str| Ok(());
        let s = TlsSettings::default();
        assert_eq!(s.validate(ok).unwrap_err().key, "tls.cert_file");
        let off = TlsSettings {
            enabled: Some(false),
            ..Default::default()
        };
        off.validate(ok).unwrap();
        assert!(off.load().unwrap().is_plaintext());

        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let (server, server_key) = pki.leaf(&["localhost"], "server");
        let w = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let mut s = TlsSettings {
            cert_file: Some(w("server.pem", server.pem())),
            key_file: Some(w("server.key", server_key.serialize_pem())),
            client_ca_file: Some(w("ca.pem", pki.ca.pem())),
            ..Default::default()
        };
        assert_eq!(s.validate(ok).unwrap_err().key, "tls.clients");
        s.clients.insert("a.example".into(), "kpn".into());
        s.validate(ok).unwrap();
        let e = s
            .validate(|p| {
                if p == "bt" {
                    Ok(())
                } else {
                    Err("not this carrier".into())
                }
            })
            .unwrap_err();
        assert_eq!(e.key, "tls.clients.a.example");
        assert!(matches!(s.load().unwrap(), GrpcSecurity::Mutual { .. }));

        // A key that does not fit the certificate, and a file that is no PEM.
        let other = rcgen::KeyPair::generate().unwrap();
        let mut bad = s.clone();
        bad.key_file = Some(w("other.key", other.serialize_pem()));
        assert_eq!(bad.load().unwrap_err().key, "tls.key_file");
        let mut bad = s.clone();
        bad.client_ca_file = Some(w("junk.pem", "not a certificate".into()));
        assert_eq!(bad.load().unwrap_err().key, "tls.client_ca_file");
        // The key's content never appears in an error.
        let mut bad = s.clone();
        bad.cert_file = Some(dir.path().join("server.key"));
        let e = bad.load().unwrap_err().to_string();
        assert!(!e.contains("PRIVATE KEY"), "{e}");
    }
}
