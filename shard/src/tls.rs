//! TLS towards clients, built with rustls from `[tls]`: the proxy's certificate and key,
//! and for `verify-ca`/`verify-full` the CA that client certificates must chain to. ALPN
//! offers `postgresql`, as PostgreSQL 17 does (and requires for direct TLS).

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use futures_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use futures_rustls::rustls::client::WebPkiServerVerifier;
use futures_rustls::rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider,
};
use futures_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use futures_rustls::rustls::pki_types::{ServerName, UnixTime};
use futures_rustls::rustls::server::WebPkiClientVerifier;
use futures_rustls::rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use futures_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{SslMode, TlsConfig};

pub use futures_rustls::rustls;

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
    let provider = provider();
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

/// ring, not aws-lc-rs: it builds without cmake. (rustls marks it deprecated only for
/// lacking post-quantum key exchange.)
fn provider() -> Arc<CryptoProvider> {
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How the proxy speaks TLS to servers: the connector and how much it insists.
#[derive(Clone)]
pub struct ServerTls {
    pub connector: TlsConnector,
    /// The same settings for blocking connections (the health checker).
    pub config: Arc<ClientConfig>,
    pub mode: SslMode,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .finish()
    }
}

/// The connector for server connections, or `None` with `server_sslmode = disable`.
pub fn server_connector(config: &TlsConfig) -> Result<Option<ServerTls>, TlsError> {
    let mode = config.server_sslmode;
    if mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = if mode >= SslMode::VerifyCa {
        let ca = config.server_ca_file.as_deref().ok_or_else(|| {
            error(
                "tls.server_ca_file",
                "required with server_sslmode verify-ca or verify-full",
            )
        })?;
        let mut roots = RootCertStore::empty();
        for cert in read_certs(ca, "tls.server_ca_file")? {
            roots
                .add(cert)
                .map_err(|e| error("tls.server_ca_file", format!("{ca}: {e}")))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| error("tls.server_ca_file", format!("{ca}: {e}")))?;
        if mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        }
    } else {
        Arc::new(AnyCertificate(provider.clone()))
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error("tls.server_sslmode", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match (&config.server_cert_file, &config.server_key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certs(cert, "tls.server_cert_file")?,
                read_key(key, "tls.server_key_file")?,
            )
            .map_err(|e| error("tls.server_key_file", format!("{key}: {e}")))?,
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(error(
                "tls.server_key_file",
                "required with server_cert_file",
            ))
        }
        (None, Some(_)) => {
            return Err(error(
                "tls.server_cert_file",
                "required with server_key_file",
            ))
        }
    };
    let config = Arc::new(config);
    Ok(Some(ServerTls {
        connector: TlsConnector::from(config.clone()),
        config,
        mode,
    }))
}

/// The name a server's certificate is checked against (verify-full): the host part of
/// a node's "host:port".
pub fn server_name(address: &str) -> Option<ServerName<'static>> {
    let host = match address.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => address,
    };
    ServerName::try_from(host.to_string()).ok()
}

/// verify-ca: the chain must lead to the CA; the name in the certificate is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// require, prefer, allow: encryption without checking who the server is (libpq's
/// meaning of these modes); the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
