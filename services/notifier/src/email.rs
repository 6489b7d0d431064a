//! E-mail over SMTP (lettre, tokio transport): plain SMTP for test sinks,
//! STARTTLS or implicit TLS with credentials in production.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tollguard_core::ConfigError;

use crate::config::{EmailSettings, SmtpTls};
use crate::scope::Mail;
use crate::webhook::Attempt;

/// The SMTP mailer.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    server: String,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer")
            .field("server", &self.server)
            .field("from", &self.from.to_string())
            .finish_non_exhaustive()
    }
}

/// `s***@n***.example` for `servicedesk@nec.example`.
pub fn mask_address(a: &Address) -> String {
    let user = a.user();
    let domain = a.domain();
    let first = |s: &str| s.chars().next().map(String::from).unwrap_or_default();
    let (label, rest) = domain.split_once('.').unwrap_or((domain, ""));
    let masked_domain = if rest.is_empty() {
        format!("{}***", first(label))
    } else {
        format!("{}***.{rest}", first(label))
    };
    format!("{}***@{masked_domain}", first(user))
}

impl Mailer {
    /// Builds the transport (connects lazily).
    pub fn new(s: &EmailSettings, password: Option<String>) -> Result<Option<Self>, ConfigError> {
        let Some(host) = &s.host else {
            return Ok(None);
        };
        let from: Mailbox = s
            .from
            .parse()
            .map_err(|e| ConfigError::new("email.from", format!("{:?}: {e}", s.from)))?;
        let mut b = match s.tls {
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
            SmtpTls::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                .map_err(|e| ConfigError::new("email.host", e))?,
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(host)
                .map_err(|e| ConfigError::new("email.host", e))?,
        };
        let port = s.port.unwrap_or(match s.tls {
            SmtpTls::None => 25,
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
        });
        b = b
            .port(port)
            .timeout(Some(Duration::from_millis(s.timeout_ms)));
        if let (Some(u), Some(p)) = (&s.username, password) {
            b = b.credentials(Credentials::new(u.clone(), p));
        }
        Ok(Some(Self {
            transport: b.build(),
            from,
            server: format!("{host}:{port}"),
        }))
    }

    /// The server, for logs.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends one message to one address.
    pub async fn send(
        &self,
        to: &Address,
        mail: &Mail,
        incident: &str,
        delivery_id: &str,
    ) -> Attempt {
        let msg = Message::builder()
            .from(self.from.clone())
            .to(Mailbox::new(None, to.clone()))
            .subject(mail.subject.clone())
            .header(ContentType::TEXT_PLAIN)
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("X-TollGuard-Incident"),
                incident.to_string(),
            ))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("X-TollGuard-Delivery"),
                delivery_id.to_string(),
            ))
            .body(mail.body.clone());
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                return Attempt::Permanent {
                    code: 0,
                    error: format!("cannot build the message: {e}"),
                };
            }
        };
        match self.transport.send(msg).await {
            Ok(r) => Attempt::Delivered {
                code: r.code().to_string().parse().unwrap_or(250),
            },
            Err(e) => {
                let code = e
                    .status()
                    .and_then(|c| c.to_string().parse().ok())
                    .unwrap_or(0);
                if e.is_permanent() {
                    Attempt::Permanent {
                        code,
                        error: format!("SMTP: {e}"),
                    }
                } else {
                    Attempt::Transient {
                        code,
                        error: format!("SMTP: {e}"),
                        retry_after: None,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_masked() {
        let a: Address = "servicedesk@nec.example".parse().unwrap();
        assert_eq!(mask_address(&a), "s***@n***.example");
        let a: Address = "x@localhost".parse().unwrap();
        assert_eq!(mask_address(&a), "x***@l***");
    }
}
