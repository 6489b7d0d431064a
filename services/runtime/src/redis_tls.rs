//! TLS to Redis (`rediss://` URLs, `[redis.tls]`): the CA bundle that the
//! server's certificate must chain to, and a client certificate and key for
//! servers that require one (`tls-auth-clients yes`).
//!
//! A `rediss://` URL without `[redis.tls]` verifies the server against the
//! system's trust store. `ca_file` replaces that store (a private CA, as in
//! most Redis deployments). Certificate verification cannot be turned off:
//! the redis crate's `#insecure` URL fragment is refused, and its
//! `tls-rustls-insecure` feature is not compiled in. Errors name the
//! configuration key and the file, never a URL (it may carry a password) or
//! the files' content.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use tollguard_core::ConfigError;

use crate::tls::{certs, read_pem};

/// `[redis.tls]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisTls {
    /// CA bundle (PEM) the Redis server's certificate must chain to; unset:
    /// the system trust store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for servers that verify clients.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM); never logged.
    pub key_file: Option<PathBuf>,
}

/// The loaded certificates for [`crate::redis_store::RedisStore`]
/// (`Debug` shows which parts are set, never the key).
#[derive(Clone)]
pub struct RedisTlsCerts(pub(crate) redis::TlsCertificates);

impl fmt::Debug for RedisTlsCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTlsCerts")
            .field("ca", &self.0.root_cert.is_some())
            .field("client_cert", &self.0.client_tls.is_some())
            .finish()
    }
}

impl RedisTls {
    fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Checks the URLs (`(key, url)`, e.g. `("redis.url", …)`) against this
    /// section (`section` is its key, `redis.tls`) and loads the files.
    /// `Ok(None)`: no `[redis.tls]`, plain `redis://` or a `rediss://` URL
    /// verified against the system trust store.
    pub fn load(
        &self,
        section: &str,
        urls: &[(String, &str)],
    ) -> Result<Option<RedisTlsCerts>, ConfigError> {
        let mut any_tls = false;
        for (key, url) in urls {
            let tls = url.starts_with("rediss://");
            any_tls |= tls;
            if tls && url.contains('#') {
                return Err(ConfigError::new(
                    key.as_str(),
                    "a rediss:// URL takes no #fragment: #insecure (no certificate \
                     verification) is not supported; trust a private CA with redis.tls.ca_file",
                ));
            }
            if !tls && self.is_set() {
                return Err(ConfigError::new(
                    key.as_str(),
                    format!(
                        "must be a rediss:// URL when {section} is set (TLS files are only \
                         used over TLS)"
                    ),
                ));
            }
        }
        if !self.is_set() {
            return Ok(None);
        }
        if !any_tls {
            return Err(ConfigError::new(
                section,
                "is set but no rediss:// URL is configured",
            ));
        }
        let root_cert = match &self.ca_file {
            Some(p) => {
                let key = format!("{section}.ca_file");
                let pem = read_pem(&key, p)?;
                certs(&key, p, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let client_tls = match (&self.cert_file, &self.key_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    format!("{section}.key_file"),
                    format!("is required with {section}.cert_file"),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    format!("{section}.cert_file"),
                    format!("is required with {section}.key_file"),
                ));
            }
            (Some(c), Some(k)) => {
                let ckey = format!("{section}.cert_file");
                let client_cert = read_pem(&ckey, c)?;
                certs(&ckey, c, &client_cert)?;
                let kkey = format!("{section}.key_file");
                let client_key = read_pem(&kkey, k)?;
                no_key(&kkey, k, &client_key)?;
                Some(redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                })
            }
        };
        let certs = redis::TlsCertificates {
            client_tls,
            root_cert,
        };
        // The redis crate parses the PEM again when it builds a client: make
        // sure it accepts them now rather than at the first connect.
        for (key, url) in urls {
            redis::Client::build_with_tls(*url, certs.clone()).map_err(|e| {
                ConfigError::new(
                    section,
                    format!(
                        "the TLS files are not usable for {key}: {}",
                        e.detail().unwrap_or("invalid")
                    ),
                )
            })?;
        }
        Ok(Some(RedisTlsCerts(certs)))
    }
}

fn no_key(key: &str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map(|_| ())
        .map_err(|_| ConfigError::new(key, format!("{} holds no PEM private key", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let w = |n: &str, t: String| {
            let p = dir.join(n);
            std::fs::write(&p, t).unwrap();
            p
        };
        (
            w("ca.pem", cert.pem()),
            w("client.pem", cert.pem()),
            w("client.key", key.serialize_pem()),
        )
    }

    fn urls(u: &str) -> Vec<(String, &str)> {
        vec![("redis.url".to_string(), u)]
    }

    #[test]
    fn files_are_checked_and_keys_named() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = pem_files(dir.path());
        let none = RedisTls::default();
        assert!(
            none.load("redis.tls", &urls("redis://h/"))
                .unwrap()
                .is_none()
        );
        assert!(
            none.load("redis.tls", &urls("rediss://h/"))
                .unwrap()
                .is_none()
        );
        let e = none
            .load("redis.tls", &urls("rediss://h/#insecure"))
            .unwrap_err();
        assert_eq!(e.key, "redis.url");

        let full = RedisTls {
            ca_file: Some(ca.clone()),
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
        };
        let c = full
            .load("redis.tls", &urls("rediss://u:pw@h:1/"))
            .unwrap()
            .unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("PRIVATE"), "{dbg}");
        // TLS files with a plaintext URL.
        let e = full
            .load("redis.tls", &urls("redis://u:s3cret@h/"))
            .unwrap_err();
        assert_eq!(e.key, "redis.url");
        assert!(!e.reason.contains("s3cret"), "{e}");
        // Half a client identity.
        let half = RedisTls {
            key_file: None,
            ..full.clone()
        };
        assert_eq!(
            half.load("redis.tls", &urls("rediss://h/"))
                .unwrap_err()
                .key,
            "redis.tls.key_file"
        );
        // A missing CA file, a CA file that is a key, a key file that is a
        // certificate.
        let bad = |f: RedisTls| f.load("redis.tls", &urls("rediss://h/")).unwrap_err();
        let e = bad(RedisTls {
            ca_file: Some(dir.path().join("nope.pem")),
            ..Default::default()
        });
        assert_eq!(e.key, "redis.tls.ca_file");
        let e = bad(RedisTls {
            ca_file: Some(key.clone()),
            ..Default::default()
        });
        assert_eq!(e.key, "redis.tls.ca_file");
        let e = bad(RedisTls {
            key_file: Some(ca.clone()),
            ..full.clone()
        });
        assert_eq!(e.key, "redis.tls.key_file");
        // The key's content never appears in an error.
        let key_text = std::fs::read_to_string(&key).unwrap();
        let body = key_text.lines().nth(1).unwrap();
        assert!(!e.reason.contains(body));
        // Cluster nodes: each URL checked.
        let e = full
            .load(
                "redis.tls",
                &[
                    ("redis.cluster_nodes[0]".to_string(), "rediss://a/"),
                    ("redis.cluster_nodes[1]".to_string(), "redis://b/"),
                ],
            )
            .unwrap_err();
        assert_eq!(e.key, "redis.cluster_nodes[1]");
    }
}
