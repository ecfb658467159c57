//! TLS towards clients, built with rustls from `[tls]`: the proxy's certificate and key,
//! and for `verify-ca`/`verify-full` the CA that client certificates must chain to. ALPN
//! offers `postgresql`, as PostgreSQL 17 does (and requires for direct TLS).

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use futures_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use futures_rustls::rustls::server::WebPkiClientVerifier;
use futures_rustls::rustls::{self, RootCertStore, ServerConfig};
use futures_rustls::TlsAcceptor;

use crate::config::{SslMode, TlsConfig};

/// The ALPN protocol name PostgreSQL registered.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// A TLS setup failed: the key it is about, and why.
#[derive(Debug)]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

fn error(key: &'static str, message: impl Into<String>) -> TlsError {
    TlsError {
        key,
        message: message.into(),
    }
}

/// The acceptor for clients' TLS handshakes, or `None` with `client_sslmode = disable`.
pub fn client_acceptor(config: &TlsConfig) -> Result<Option<TlsAcceptor>, TlsError> {
    if config.client_sslmode == SslMode::Disable {
        return Ok(None);
    }
    let cert_path = config.client_cert_file.as_deref().ok_or_else(|| {
        error(
            "tls.client_cert_file",
            "required when client_sslmode is not disable",
        )
    })?;
    let key_path = config.client_key_file.as_deref().ok_or_else(|| {
        error(
            "tls.client_key_file",
            "required when client_sslmode is not disable",
        )
    })?;
    let certs = read_certs(cert_path, "tls.client_cert_file")?;
    let key = read_key(key_path, "tls.client_key_file")?;
    // ring, not aws-lc-rs: it builds without cmake. (rustls marks it deprecated only
    // for lacking post-quantum key exchange.)
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = match (&config.client_ca_file, config.client_sslmode) {
        (Some(ca), mode) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "tls.client_ca_file")? {
                roots
                    .add(cert)
                    .map_err(|e| error("tls.client_ca_file", format!("{ca}: {e}")))?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if mode >= SslMode::VerifyCa {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            builder
                .build()
                .map_err(|e| error("tls.client_ca_file", format!("{ca}: {e}")))?
        }
        (None, mode) if mode >= SslMode::VerifyCa => {
            return Err(error(
                "tls.client_ca_file",
                "required with client_sslmode verify-ca or verify-full",
            ))
        }
        (None, _) => WebPkiClientVerifier::no_client_auth(),
    };
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error("tls.client_sslmode", e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| error("tls.client_key_file", format!("{key_path}: {e}")))?;
    server.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

fn read_certs(path: &str, key: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = File::open(path).map_err(|e| error(key, format!("{path}: {e}")))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<_, _>>()
        .map_err(|e| error(key, format!("{path}: {e}")))?;
    if certs.is_empty() {
        return Err(error(key, format!("{path}: no PEM certificate in it")));
    }
    Ok(certs)
}

fn read_key(path: &str, key: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = File::open(path).map_err(|e| error(key, format!("{path}: {e}")))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| error(key, format!("{path}: {e}")))?
        .ok_or_else(|| error(key, format!("{path}: no PEM private key in it")))
}

/// The common name of a DER certificate's subject, when it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
