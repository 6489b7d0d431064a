//! A throw-away PKI for the security tests, made with `rcgen`: the
//! consortium CA, a server certificate for `localhost`, client certificates
//! of carriers and of the operator, and an untrusted CA whose certificate
//! claims a trusted identity.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA that can issue certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

/// A certificate and its key, PEM.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self { cert, params, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    fn issue(&self, sans: &[&str], cn: &str, server: bool) -> Pem {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost`.
    pub fn server(&self) -> Pem {
        self.issue(&["localhost"], "tollguard test server", true)
    }

    /// A server certificate for `sans` (DNS names or IP addresses).
    pub fn server_for(&self, sans: &[&str]) -> Pem {
        self.issue(sans, "tollguard test server", true)
    }

    /// A client certificate with SAN DNS names `sans` and subject CN `cn`.
    pub fn client(&self, sans: &[&str], cn: &str) -> Pem {
        self.issue(sans, cn, false)
    }
}

/// The PKI of a test, with its files written to a directory.
pub struct Pki {
    pub ca: Ca,
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let ca = Ca::new("TollGuard consortium test CA");
        let server = ca.server();
        let w = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        Self {
            ca_file: w("client-ca.pem", &ca.pem()),
            server_cert: w("server.pem", &server.cert),
            server_key: w("server.key", &server.key),
            ca,
        }
    }

    /// `TOLLGUARD__TLS__*` overrides serving mTLS with `clients`
    /// (identity → principal; identities without dots or capitals, as the
    /// override names are lower-cased and split on `__`).
    pub fn env(&self, clients: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v = vec![
            ("TOLLGUARD__TLS__ENABLED".to_string(), "true".to_string()),
            (
                "TOLLGUARD__TLS__CERT_FILE".into(),
                self.server_cert.display().to_string(),
            ),
            (
                "TOLLGUARD__TLS__KEY_FILE".into(),
                self.server_key.display().to_string(),
            ),
            (
                "TOLLGUARD__TLS__CLIENT_CA_FILE".into(),
                self.ca_file.display().to_string(),
            ),
        ];
        for (id, p) in clients {
            v.push((
                format!("TOLLGUARD__TLS__CLIENTS__{}", id.to_uppercase()),
                p.to_string(),
            ));
        }
        v
    }

    /// A TLS channel to `127.0.0.1:port` trusting the CA, presenting
    /// `client` (if any).
    pub async fn channel(&self, port: u16, client: Option<&Pem>) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.pem()))
            .domain_name("localhost");
        if let Some(c) = client {
            tls = tls.identity(Identity::from_pem(&c.cert, &c.key));
        }
        Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))
    }
}
