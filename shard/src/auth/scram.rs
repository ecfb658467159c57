//! SCRAM-SHA-256 (RFC 5802, RFC 7677) the way PostgreSQL speaks it: no channel binding,
//! the user name taken from the startup packet (clients send "n="), passwords normalised
//! with SASLprep when valid for it. [`ScramServer`] authenticates clients of the proxy,
//! [`ScramClient`] logs the proxy in to backends.

mod keys;
mod message;

use rand::RngCore;
use subtle::ConstantTimeEq;

use crate::auth::secret::ScramVerifier;
use keys::normalize_password;
use message::{parse_client_final, parse_client_first, parse_server_final, parse_server_first};

// For the verifier in `secret`, which stores and parses the same keys.
pub(crate) use keys::{verifier_keys, Key};
pub(crate) use message::{decode_base64, decode_key, encode_base64, parse_iterations};

/// The SASL mechanism name announced in AuthenticationSASL.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// Random bytes in a nonce; PostgreSQL and libpq both use 18.
const RAW_NONCE_LEN: usize = 18;

/// The "c=" attribute of a client without channel binding: base64 of the gs2 header "n,,".
const CHANNEL_BINDING_NONE: &str = "c=biws";

/// Why a SCRAM exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The peer sent a message that is not valid SCRAM, or sent it out of order.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client's proof does not match the stored verifier: wrong password.
    #[error("password authentication failed")]
    BadProof,
    /// The peer asked for a SCRAM feature PostgreSQL does not offer here.
    #[error("unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),
    /// The server could not prove it knows the verifier: it is not the server we trust.
    #[error("server's SCRAM signature does not verify")]
    BadServerSignature,
    /// Logging in with keys recovered from a client's proof, the server offered another
    /// salt or iteration count: the role's password changed since that client logged in.
    #[error("the server's SCRAM salt differs from the one the client logged in with (password changed?)")]
    StaleKeys,
}

impl ScramError {
    /// SQLSTATE for reporting the failure to a client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ScramError::Malformed(_) | ScramError::Unsupported(_) => "08P01",
            ScramError::BadProof => "28P01",
            ScramError::BadServerSignature => "08006",
            ScramError::StaleKeys => "28P01",
        }
    }
}

/// Fresh client or server nonce: base64 of random bytes, which is printable and comma-free.
fn random_nonce() -> String {
    let mut raw = [0u8; RAW_NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut raw);
    encode_base64(&raw)
}

/// The server side of one SCRAM exchange, checking a client's proof against a verifier.
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    state: ServerState,
    /// Recovered from a proof that verified: what lets the proxy log in as the client.
    client_key: Option<Key>,
}

/// What a SCRAM client needs to log in to a server holding one verifier, without the
/// password: the ClientKey recovered from a client's proof (SCRAM pass-through), with the
/// salt and iteration count it belongs to and the ServerKey that checks the server.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub client_key: Key,
    pub server_key: Key,
}

/// Keys stay out of logs.
impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramKeys(<redacted>, {} iterations)", self.iterations)
    }
}

enum ServerState {
    AwaitingClientFirst,
    AwaitingClientFinal(ServerTranscript),
    Done,
}

/// What the server must remember between its two messages.
struct ServerTranscript {
    gs2_header: Vec<u8>,
    client_first_bare: Vec<u8>,
    server_first: Vec<u8>,
    /// Client nonce followed by the server nonce; the client must echo it exactly.
    nonce: Vec<u8>,
}

impl ScramServer {
    pub fn new(verifier: ScramVerifier) -> Self {
        Self::with_nonce(verifier, random_nonce())
    }

    fn with_nonce(verifier: ScramVerifier, server_nonce: String) -> Self {
        ScramServer {
            verifier,
            server_nonce,
            state: ServerState::AwaitingClientFirst,
            client_key: None,
        }
    }

    /// Handles the client-first-message (the SASLInitialResponse data) and returns the
    /// server-first-message to send in AuthenticationSASLContinue.
    pub fn client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        // The exchange counts as over until this message succeeds: a failure is final.
        let state = std::mem::replace(&mut self.state, ServerState::Done);
        if !matches!(state, ServerState::AwaitingClientFirst) {
            return Err(ScramError::Malformed("client-first-message out of order"));
        }
        let first = parse_client_first(data)?;
        let nonce = [first.nonce, self.server_nonce.as_bytes()].concat();
        let server_first = [
            b"r=",
            nonce.as_slice(),
            b",s=",
            encode_base64(&self.verifier.salt).as_bytes(),
            b",i=",
            self.verifier.iterations.to_string().as_bytes(),
        ]
        .concat();
        self.state = ServerState::AwaitingClientFinal(ServerTranscript {
            gs2_header: first.gs2_header.to_vec(),
            client_first_bare: first.bare.to_vec(),
            server_first: server_first.clone(),
            nonce,
        });
        Ok(server_first)
    }

    /// Handles the client-final-message, verifies the proof and returns the
    /// server-final-message "v=…" to send in AuthenticationSASLFinal.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let ServerState::AwaitingClientFinal(transcript) =
            std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(ScramError::Malformed("client-final-message out of order"));
        };
        let last = parse_client_final(data)?;
        if last.channel_binding != transcript.gs2_header {
            return Err(ScramError::Malformed(
                "channel binding does not match gs2 header",
            ));
        }
        if last.nonce != transcript.nonce.as_slice() {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let auth_message: [&[u8]; 5] = [
            &transcript.client_first_bare,
            b",",
            &transcript.server_first,
            b",",
            last.without_proof,
        ];
        let Some(client_key) = self.proven_client_key(&auth_message, &last.proof) else {
            return Err(ScramError::BadProof);
        };
        self.client_key = Some(client_key);
        let signature = keys::hmac(&self.verifier.server_key, &auth_message);
        Ok(format!("v={}", encode_base64(&signature)).into_bytes())
    }

    /// ClientKey = proof XOR HMAC(StoredKey, AuthMessage); valid iff H(ClientKey) = StoredKey.
    fn proven_client_key(&self, auth_message: &[&[u8]], proof: &Key) -> Option<Key> {
        let client_signature = keys::hmac(&self.verifier.stored_key, auth_message);
        let client_key = keys::xor(proof, &client_signature);
        bool::from(keys::sha256(&client_key).ct_eq(&self.verifier.stored_key)).then_some(client_key)
    }

    /// After a successful exchange: the keys to log in to a server that holds the same
    /// verifier, as this client.
    pub fn keys(&self) -> Option<ScramKeys> {
        Some(ScramKeys {
            salt: self.verifier.salt.clone(),
            iterations: self.verifier.iterations,
            client_key: self.client_key?,
            server_key: self.verifier.server_key,
        })
    }
}

/// Salted passwords for one credential by (salt, iterations): servers keep both fixed per
/// role, so after the first login every further one skips PBKDF2. Holds a handful at most.
#[derive(Default)]
pub struct SaltedPasswordCache {
    entries: Vec<(Vec<u8>, u32, keys::Key)>,
}

impl SaltedPasswordCache {
    const MAX_ENTRIES: usize = 4;

    fn get_or_derive(&mut self, password: &[u8], salt: &[u8], iterations: u32) -> keys::Key {
        if let Some((_, _, key)) = self
            .entries
            .iter()
            .find(|(s, i, _)| s.as_slice() == salt && *i == iterations)
        {
            return *key;
        }
        let key = keys::salted_password(password, salt, iterations);
        if self.entries.len() == Self::MAX_ENTRIES {
            self.entries.remove(0);
        }
        self.entries.push((salt.to_vec(), iterations, key));
        key
    }
}

impl std::fmt::Debug for SaltedPasswordCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SaltedPasswordCache({} entries)", self.entries.len())
    }
}

/// The client side of one SCRAM exchange, used to log in to a backend.
pub struct ScramClient {
    secret: ClientSecret,
    client_first_bare: String,
    nonce: String,
    /// ServerSignature we expect, known once the client-final-message is built.
    expected_server_signature: Option<Key>,
}

/// What a [`ScramClient`] proves itself with.
enum ClientSecret {
    /// Normalize(password), kept instead of the password itself.
    Password(Vec<u8>),
    Keys(ScramKeys),
}

impl ScramClient {
    pub fn new(password: &str) -> Self {
        Self::with_nonce(password, "", random_nonce())
    }

    /// A client that proves itself with keys recovered from another client's proof; the
    /// server must offer the salt and iteration count they belong to.
    pub fn with_keys(keys: ScramKeys) -> Self {
        Self::with_secret(ClientSecret::Keys(keys), "", random_nonce())
    }

    /// `user` is only for RFC test vectors: PostgreSQL clients send an empty name.
    fn with_nonce(password: &str, user: &str, nonce: String) -> Self {
        let password = normalize_password(password.as_bytes()).into_owned();
        Self::with_secret(ClientSecret::Password(password), user, nonce)
    }

    fn with_secret(secret: ClientSecret, user: &str, nonce: String) -> Self {
        ScramClient {
            secret,
            client_first_bare: format!("n={user},r={nonce}"),
            nonce,
            expected_server_signature: None,
        }
    }

    /// The client-first-message: "n,,n=,r=<nonce>".
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Handles the server-first-message and returns the client-final-message.
    pub fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        self.server_first_cached(data, &mut SaltedPasswordCache::default())
    }

    /// Like [`server_first`](Self::server_first), reusing a salted password derived earlier
    /// for the same server salt and iteration count (PBKDF2 is the expensive part of a login).
    /// The cache must only ever see this client's password.
    pub fn server_first_cached(
        &mut self,
        data: &[u8],
        cache: &mut SaltedPasswordCache,
    ) -> Result<Vec<u8>, ScramError> {
        if self.expected_server_signature.is_some() {
            return Err(ScramError::Malformed("server-first-message sent twice"));
        }
        let first = parse_server_first(data)?;
        // The server must extend our nonce; otherwise it could be replaying an old exchange.
        let ours = self.nonce.as_bytes();
        if first.nonce.len() <= ours.len() || !first.nonce.starts_with(ours) {
            return Err(ScramError::Malformed(
                "server nonce does not extend the client nonce",
            ));
        }
        let (client_key, server_key) = match &self.secret {
            ClientSecret::Password(password) => {
                let salted = cache.get_or_derive(password, &first.salt, first.iterations);
                (keys::client_key(&salted), keys::server_key(&salted))
            }
            ClientSecret::Keys(known) => {
                if known.salt != first.salt || known.iterations != first.iterations {
                    return Err(ScramError::StaleKeys);
                }
                (known.client_key, known.server_key)
            }
        };
        let stored_key = keys::sha256(&client_key);
        let without_proof = [CHANNEL_BINDING_NONE.as_bytes(), b",r=", first.nonce].concat();
        let auth_message: [&[u8]; 5] = [
            self.client_first_bare.as_bytes(),
            b",",
            data,
            b",",
            &without_proof,
        ];
        let client_signature = keys::hmac(&stored_key, &auth_message);
        let proof = keys::xor(&client_key, &client_signature);
        self.expected_server_signature = Some(keys::hmac(&server_key, &auth_message));
        let proof = encode_base64(&proof);
        Ok([without_proof.as_slice(), b",p=", proof.as_bytes()].concat())
    }

    /// Checks the server-final-message: the server must prove it holds the verifier.
    pub fn server_final(&self, data: &[u8]) -> Result<(), ScramError> {
        let Some(expected) = self.expected_server_signature else {
            return Err(ScramError::Malformed("server-final-message out of order"));
        };
        let signature = parse_server_final(data)?;
        if bool::from(signature.ct_eq(&expected)) {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 §3 test vector (user "user", password "pencil").
    mod rfc7677 {
        pub const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
        pub const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        pub const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
        pub const SERVER_FIRST: &str =
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        pub const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        pub const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
        pub const SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    }

    fn rfc_verifier() -> ScramVerifier {
        let salt = decode_base64(rfc7677::SALT.as_bytes(), "salt").expect("valid salt");
        ScramVerifier::generate("pencil", &salt, 4096)
    }

    #[test]
    fn client_matches_rfc7677() {
        let mut client = ScramClient::with_nonce("pencil", "user", rfc7677::CLIENT_NONCE.into());
        assert_eq!(client.client_first(), rfc7677::CLIENT_FIRST.as_bytes());
        let last = client
            .server_first(rfc7677::SERVER_FIRST.as_bytes())
            .expect("valid server-first");
        assert_eq!(String::from_utf8(last).unwrap(), rfc7677::CLIENT_FINAL);
        client
            .server_final(rfc7677::SERVER_FINAL.as_bytes())
            .expect("server signature verifies");
    }

    #[test]
    fn server_matches_rfc7677() {
        let mut server = ScramServer::with_nonce(rfc_verifier(), rfc7677::SERVER_NONCE.into());
        let first = server
            .client_first(rfc7677::CLIENT_FIRST.as_bytes())
            .expect("valid client-first");
        assert_eq!(String::from_utf8(first).unwrap(), rfc7677::SERVER_FIRST);
        let last = server
            .client_final(rfc7677::CLIENT_FINAL.as_bytes())
            .expect("proof verifies");
        assert_eq!(String::from_utf8(last).unwrap(), rfc7677::SERVER_FINAL);
    }

    /// Runs a whole exchange between a client knowing `password` and a server holding `verifier`.
    fn exchange(password: &str, verifier: ScramVerifier) -> Result<(), ScramError> {
        let mut client = ScramClient::new(password);
        let mut server = ScramServer::new(verifier);
        let client_first = client.client_first();
        assert!(client_first.starts_with(b"n,,n=,r="));
        let server_first = server.client_first(&client_first)?;
        let client_final = client.server_first(&server_first)?;
        let server_final = server.client_final(&client_final)?;
        client.server_final(&server_final)
    }

    #[test]
    fn end_to_end_right_password() {
        let verifier = ScramVerifier::generate("s3cret", b"0123456789abcdef", 4096);
        assert_eq!(exchange("s3cret", verifier), Ok(()));
    }

    #[test]
    fn end_to_end_saslprep_equivalent_password() {
        let verifier = ScramVerifier::generate("IX", b"salt", 16);
        assert_eq!(exchange("\u{2168}", verifier), Ok(()));
    }

    #[test]
    fn cached_salted_password_serves_later_logins() {
        let verifier = ScramVerifier::generate("s3cret", b"0123456789abcdef", 4096);
        let mut cache = SaltedPasswordCache::default();
        for _ in 0..3 {
            let mut client = ScramClient::new("s3cret");
            let mut server = ScramServer::new(verifier.clone());
            let server_first = server.client_first(&client.client_first()).unwrap();
            let client_final = client
                .server_first_cached(&server_first, &mut cache)
                .unwrap();
            let server_final = server.client_final(&client_final).unwrap();
            assert_eq!(client.server_final(&server_final), Ok(()));
        }
        assert_eq!(cache.entries.len(), 1);
    }

    #[test]
    fn keys_from_a_client_proof_log_in_to_the_same_verifier() {
        let verifier = ScramVerifier::generate("s3cret", b"0123456789abcdef", 4096);
        let mut client = ScramClient::new("s3cret");
        let mut server = ScramServer::new(verifier.clone());
        assert!(server.keys().is_none());
        let server_first = server.client_first(&client.client_first()).unwrap();
        let server_final = server
            .client_final(&client.server_first(&server_first).unwrap())
            .unwrap();
        client.server_final(&server_final).unwrap();
        let keys = server.keys().expect("a verified proof yields keys");
        // A second exchange, the proxy now the client, with no password at hand.
        let mut proxy = ScramClient::with_keys(keys.clone());
        let mut backend = ScramServer::new(verifier);
        let backend_first = backend.client_first(&proxy.client_first()).unwrap();
        let backend_final = backend
            .client_final(&proxy.server_first(&backend_first).unwrap())
            .unwrap();
        assert_eq!(proxy.server_final(&backend_final), Ok(()));
        // After a password change the server's salt differs: the keys are stale.
        let changed = ScramVerifier::generate("s3cret", b"another salt....", 4096);
        let mut proxy = ScramClient::with_keys(keys);
        let mut backend = ScramServer::new(changed);
        let backend_first = backend.client_first(&proxy.client_first()).unwrap();
        assert_eq!(
            proxy.server_first(&backend_first),
            Err(ScramError::StaleKeys)
        );
    }

    #[test]
    fn end_to_end_wrong_password() {
        let verifier = ScramVerifier::generate("s3cret", b"0123456789abcdef", 4096);
        assert_eq!(exchange("secret", verifier), Err(ScramError::BadProof));
    }

    #[test]
    fn client_rejects_forged_server_signature() {
        let verifier = ScramVerifier::generate("s3cret", b"salt", 16);
        let mut client = ScramClient::new("s3cret");
        let mut server = ScramServer::new(verifier);
        let server_first = server.client_first(&client.client_first()).unwrap();
        client.server_first(&server_first).unwrap();
        let forged = format!("v={}", encode_base64(&[0u8; 32]));
        assert_eq!(
            client.server_final(forged.as_bytes()),
            Err(ScramError::BadServerSignature)
        );
    }

    #[test]
    fn client_requires_server_to_extend_nonce() {
        let mut client = ScramClient::with_nonce("pw", "", "abc".into());
        for bad in [
            "r=abc,s=c2FsdA==,i=1",
            "r=abd1,s=c2FsdA==,i=1",
            "r=ab,s=c2FsdA==,i=1",
        ] {
            assert!(
                matches!(
                    client.server_first(bad.as_bytes()),
                    Err(ScramError::Malformed(_))
                ),
                "{bad}"
            );
        }
        assert!(client.server_first(b"r=abcd,s=c2FsdA==,i=1").is_ok());
    }

    #[test]
    fn client_enforces_message_order() {
        let mut client = ScramClient::with_nonce("pw", "", "abc".into());
        let final_message = format!("v={}", encode_base64(&[0u8; 32]));
        assert!(client.server_final(final_message.as_bytes()).is_err());
        client.server_first(b"r=abcd,s=c2FsdA==,i=1").unwrap();
        assert!(client.server_first(b"r=abcd,s=c2FsdA==,i=1").is_err());
    }

    #[test]
    fn server_checks_channel_binding_and_nonce() {
        let verifier = ScramVerifier::generate("pw", b"salt", 16);
        let proof = encode_base64(&[0u8; 32]);
        let cases = [
            ("n,,n=,r=abc", format!("c=eSws,r=abcXYZ,p={proof}")),
            ("y,,n=,r=abc", format!("c=biws,r=abcXYZ,p={proof}")),
            ("n,,n=,r=abc", format!("c=biws,r=abcXY,p={proof}")),
            ("n,,n=,r=abc", format!("c=biws,r=abc,p={proof}")),
        ];
        for (first, last) in cases {
            let mut server = ScramServer::with_nonce(verifier.clone(), "XYZ".into());
            server.client_first(first.as_bytes()).unwrap();
            assert!(
                matches!(
                    server.client_final(last.as_bytes()),
                    Err(ScramError::Malformed(_))
                ),
                "{first} / {last}"
            );
        }
    }

    #[test]
    fn server_accepts_y_flag_from_client() {
        let verifier = ScramVerifier::generate("pw", b"salt", 16);
        let mut server = ScramServer::with_nonce(verifier, "XYZ".into());
        let mut client = ScramClient::with_nonce("pw", "", "abc".into());
        let first = client.client_first();
        let y_first = [b"y", &first[1..]].concat();
        let server_first = server.client_first(&y_first).unwrap();
        let last = client.server_first(&server_first).unwrap();
        // The client echoes its gs2 header, which for "y,," is "eSws".
        let y_last = String::from_utf8(last)
            .unwrap()
            .replacen("c=biws", "c=eSws", 1);
        // The proof covers the final message, so changing "c=" must make it fail.
        assert_eq!(
            server.client_final(y_last.as_bytes()),
            Err(ScramError::BadProof)
        );
    }

    #[test]
    fn server_enforces_message_order() {
        let verifier = ScramVerifier::generate("pw", b"salt", 16);
        let mut server = ScramServer::new(verifier.clone());
        let proof = encode_base64(&[0u8; 32]);
        let last = format!("c=biws,r=abc,p={proof}");
        assert!(server.client_final(last.as_bytes()).is_err());

        let mut server = ScramServer::new(verifier.clone());
        server.client_first(b"n,,n=,r=abc").unwrap();
        assert!(server.client_first(b"n,,n=,r=abc").is_err());

        let mut server = ScramServer::new(verifier);
        assert!(server.client_first(b"garbage").is_err());
        assert!(
            server.client_first(b"n,,n=,r=abc").is_err(),
            "a failed exchange stays failed"
        );
    }

    #[test]
    fn server_survives_arbitrary_bytes() {
        let verifier = ScramVerifier::generate("pw", b"salt", 1);
        let inputs: [&[u8]; 8] = [
            b"",
            b",,,,",
            b"n,,n=,r=\xff",
            b"n,,n=\xff\xfe,r=abc",
            b"\x00\x00\x00",
            &[b'='; 300],
            b"n,,n=,r=abc,p=,p=,p=",
            b"c=,r=,p=",
        ];
        for input in inputs {
            let mut server = ScramServer::new(verifier.clone());
            let _ = server.client_first(input);
            let mut server = ScramServer::new(verifier.clone());
            if server.client_first(b"n,,n=,r=abc").is_ok() {
                assert!(server.client_final(input).is_err());
            }
        }
    }

    #[test]
    fn sqlstates() {
        assert_eq!(ScramError::Malformed("x").sqlstate(), "08P01");
        assert_eq!(ScramError::Unsupported("x").sqlstate(), "08P01");
        assert_eq!(ScramError::BadProof.sqlstate(), "28P01");
        assert_eq!(ScramError::BadServerSignature.sqlstate(), "08006");
    }
}
