//! Certificates a test makes for itself: a CA, a server certificate for localhost and
//! 127.0.0.1 signed by it, a client certificate with a chosen CN, and a second CA that
//! signed nothing (for verification failures).

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// The certificate files of one test, in a temp dir.
pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn make(client_cn: &str) -> Certs {
        let dir = tempfile::Builder::new()
            .prefix("helios-tls-")
            .tempdir()
            .expect("temp dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "HeliosProxy test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server = server_params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server cert");

        let client_key = KeyPair::generate().expect("client key");
        let mut client_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        client_params
            .distinguished_name
            .push(DnType::CommonName, client_cn);
        let client = client_params
            .signed_by(&client_key, &ca, &ca_key)
            .expect("client cert");

        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).expect("write PEM");
            // libpq refuses a key file others can read.
            let mut perms = std::fs::metadata(&path).expect("meta").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
            std::fs::set_permissions(&path, perms).expect("chmod");
        };
        write("ca.pem", ca.pem());
        write("server.pem", server.pem());
        write("server.key", server_key.serialize_pem());
        write("client.pem", client.pem());
        write("client.key", client_key.serialize_pem());
        // A CA nobody signed the proxy's certificate with.
        let other_key = KeyPair::generate().expect("other CA key");
        let mut other = CertificateParams::new(Vec::<String>::new()).expect("params");
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        other
            .distinguished_name
            .push(DnType::CommonName, "Other CA");
        write(
            "other-ca.pem",
            other.self_signed(&other_key).expect("other").pem(),
        );
        Certs { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn file(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// `[tls]` for the proxy.
    pub fn config(&self, mode: &str, with_ca: bool) -> String {
        let mut text = format!(
            "[tls]\nclient_sslmode = \"{mode}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            self.file("server.pem"),
            self.file("server.key")
        );
        if with_ca {
            text.push_str(&format!("client_ca_file = \"{}\"\n", self.file("ca.pem")));
        }
        text
    }
}
