//! TLS to the data services: loading the CA bundles and client certificates
//! operators point us at, building the rustls client configuration for Redis,
//! and turning certificate failures into one readable line.
//!
//! The TLS itself is rustls (ring provider) inside sqlx and fred; nothing here
//! speaks TLS. What this module adds is the rule that a certificate problem is a
//! configuration mistake, not an outage: waiting cannot fix an unknown CA, a
//! wrong host name or a missing file, so start-up stops at once and says which
//! (see [`describe`]), instead of retrying as if the server were down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// A TLS set-up that cannot work; its message is one line naming the cause.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsSetupError(String);

/// The certificates of a PEM bundle (`sslrootcert`, `REDIS_CA_CERT`).
///
/// A file that is missing, unreadable or holds no certificate is an error
/// naming the file and `what` configured it.
pub fn read_certificates(
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = std::fs::read(path)
        .map_err(|e| TlsSetupError(format!("{what} {}: {e}", path.display())))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsSetupError(format!(
                "{what} {}: not a PEM certificate bundle ({e})",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError(format!(
            "{what} {}: holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The files behind a `rediss://` connection, all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTlsFiles {
    /// `REDIS_CA_CERT`: when set, the only CAs trusted for the Redis server
    /// (a private CA); otherwise the public roots compiled into the binary.
    pub ca_cert: Option<PathBuf>,
    /// `REDIS_CLIENT_CERT` and `REDIS_CLIENT_KEY`, for servers that require
    /// client certificates (`tls-auth-clients yes`). Set together or not at all.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl RedisTlsFiles {
    /// The rustls client configuration for these files. Every file is read
    /// now, so a mistake stops start-up before the first connection attempt.
    pub fn client_config(&self) -> Result<ClientConfig, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        match &self.ca_cert {
            // A private CA replaces the public roots, as libpq's `sslrootcert`
            // does: a certificate from any public CA is not our Redis.
            Some(path) => {
                for cert in read_certificates(path, "REDIS_CA_CERT")? {
                    roots.add(cert).map_err(|e| {
                        TlsSetupError(format!("REDIS_CA_CERT {}: {e}", path.display()))
                    })?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        // Explicit provider: which one rustls would pick by default depends on
        // the features other crates happen to enable.
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| TlsSetupError(format!("TLS set-up: {e}")))?
                .with_root_certificates(roots);
        match (&self.client_cert, &self.client_key) {
            (None, None) => Ok(builder.with_no_client_auth()),
            (Some(cert), Some(key)) => {
                let chain = read_certificates(cert, "REDIS_CLIENT_CERT")?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                    TlsSetupError(format!(
                        "REDIS_CLIENT_KEY {}: no usable PEM private key ({e})",
                        key.display()
                    ))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    TlsSetupError(format!(
                        "REDIS_CLIENT_CERT/REDIS_CLIENT_KEY do not form a usable pair: {e}"
                    ))
                })
            }
            _ => Err(TlsSetupError(
                "REDIS_CLIENT_CERT and REDIS_CLIENT_KEY must be set together".into(),
            )),
        }
    }
}

/// The rustls error somewhere in `err`'s chain, if the failure was TLS.
///
/// rustls reports handshake failures as an `io::Error` wrapping its own error,
/// so the chain is searched through `io::Error::get_ref` as well as `source`.
pub fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
                return Some(tls);
            }
            current = Some(inner);
            continue;
        }
        current = err.source();
    }
    None
}

/// One line saying what is wrong with a certificate exchange, with the usual
/// fix; `ca_setting` names where the trusted CAs come from (`sslrootcert`,
/// `REDIS_CA_CERT`).
pub fn describe(err: &rustls::Error, ca_setting: &str) -> String {
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "the server's certificate is not signed by a trusted CA (check {ca_setting}): {err}"
        ),
        _ if is_name_mismatch(err) => format!(
            "the server's certificate does not match the host name connected to \
             (connect by a name the certificate lists): {err}"
        ),
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("the server's certificate has expired: {err}")
        }
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's certificate was rejected: {err}")
        }
        rustls::Error::AlertReceived(_) => format!(
            "the server refused the TLS handshake (a missing or unaccepted client \
             certificate?): {err}"
        ),
        _ => format!("TLS handshake failed: {err}"),
    }
}

/// The certificate is fine but names another host.
pub fn is_name_mismatch(err: &rustls::Error) -> bool {
    matches!(
        err,
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. }
        )
    )
}

/// [`describe`] for a client that reports TLS failures as text only (fred keeps
/// the `Debug` rendering of the rustls error, not the error itself). `None`
/// when the text is not a TLS failure.
pub fn describe_text(text: &str, ca_setting: &str) -> Option<String> {
    let says = |needle: &str| text.contains(needle);
    let cause = if says("UnknownIssuer") || says("BadSignature") {
        format!("the server's certificate is not signed by a trusted CA (check {ca_setting})")
    } else if says("NotValidForName") {
        "the server's certificate does not match the host name connected to \
         (connect by a name the certificate lists)"
            .to_owned()
    } else if says("Expired") && says("InvalidCertificate") {
        "the server's certificate has expired".to_owned()
    } else if says("InvalidCertificate") {
        "the server's certificate was rejected".to_owned()
    } else if says("AlertReceived") {
        "the server refused the TLS handshake (a missing or unaccepted client certificate?)"
            .to_owned()
    } else if says("InvalidMessage") || says("CorruptMessage") || says("PeerIncompatible") {
        "TLS handshake failed (is the server speaking TLS on this port?)".to_owned()
    } else {
        return None;
    };
    Some(format!("{cause}: {text}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_bundles_name_the_file() {
        let err = read_certificates(Path::new("/nonexistent/ca.pem"), "sslrootcert").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("sslrootcert /nonexistent/ca.pem: "),
            "{text}"
        );

        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let text = read_certificates(&empty, "REDIS_CA_CERT")
            .unwrap_err()
            .to_string();
        assert!(text.contains("holds no PEM certificate"), "{text}");
    }

    #[test]
    fn client_certificate_and_key_go_together() {
        let files = RedisTlsFiles {
            client_cert: Some("/x/client.pem".into()),
            ..RedisTlsFiles::default()
        };
        let text = files.client_config().unwrap_err().to_string();
        assert!(text.contains("must be set together"), "{text}");
        assert!(RedisTlsFiles::default().client_config().is_ok());
    }

    #[test]
    fn certificate_failures_are_named() {
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(describe(&unknown, "sslrootcert").contains("not signed by a trusted CA"));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, unknown.clone());
        assert_eq!(rustls_error(&io), Some(&unknown));
        let text = format!("{:?}", io);
        let line = describe_text(&text, "REDIS_CA_CERT").unwrap();
        assert!(line.contains("check REDIS_CA_CERT"), "{line}");
        assert!(describe_text("Connection refused (os error 111)", "x").is_none());
    }
}
