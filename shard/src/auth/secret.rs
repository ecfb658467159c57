//! What the proxy stores to check a user's password, in the three forms PostgreSQL itself
//! keeps in `pg_authid.rolpassword`: plain text, an md5 hash or a SCRAM-SHA-256 verifier.

use std::fmt;

use rand::RngCore;
use subtle::ConstantTimeEq;

use super::md5;
use super::scram::{decode_base64, decode_key, encode_base64, parse_iterations, verifier_keys};

/// Prefix of PostgreSQL's SCRAM-SHA-256 verifier format.
const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

/// Length of "md5" followed by 32 hex digits.
const MD5_HASH_LEN: usize = 35;

/// Salt length and iteration count PostgreSQL uses when it creates a verifier.
pub const DEFAULT_SALT_LEN: usize = 16;
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// A user's stored password.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Plain(String),
    /// "md5" followed by 32 lowercase hex digits: md5(password || user).
    Md5(String),
    Scram(ScramVerifier),
}

impl Secret {
    /// Classifies a configured password. A value that claims to be a hash (a
    /// "SCRAM-SHA-256$" prefix, or "md5" plus 32 characters) must be a valid one: a
    /// mistyped verifier must not silently become a plain password equal to its text.
    pub fn parse(s: &str) -> Result<Secret, String> {
        if s.is_empty() {
            return Err("a password must not be empty".into());
        }
        if s.starts_with(SCRAM_PREFIX) {
            return ScramVerifier::parse(s).map(Secret::Scram);
        }
        if s.starts_with("md5") && s.len() == MD5_HASH_LEN {
            return parse_md5_hash(s).map(|hash| Secret::Md5(hash.to_owned()));
        }
        Ok(Secret::Plain(s.to_owned()))
    }

    /// Checks a password a client sent in clear text (AuthenticationCleartextPassword),
    /// whatever form the secret is stored in, in constant time.
    pub fn verify_cleartext(&self, user: &str, password: &[u8]) -> bool {
        match self {
            Secret::Plain(expected) => expected.as_bytes().ct_eq(password).into(),
            Secret::Md5(hash) => md5::stored_hash_bytes(user.as_bytes(), password)
                .as_bytes()
                .ct_eq(hash.as_bytes())
                .into(),
            Secret::Scram(verifier) => verifier.verify_password(password),
        }
    }
}

/// Passwords stay out of logs.
impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Md5(<redacted>)"),
            Secret::Scram(_) => f.write_str("Scram(<redacted>)"),
        }
    }
}

fn parse_md5_hash(s: &str) -> Result<&str, String> {
    let is_lower_hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    match s.strip_prefix("md5") {
        Some(hex) if hex.len() == MD5_HASH_LEN - 3 && hex.bytes().all(|b| is_lower_hex(&b)) => {
            Ok(s)
        }
        _ => Err("an md5 password hash is \"md5\" followed by 32 lowercase hex digits".into()),
    }
}

/// A SCRAM-SHA-256 verifier, stored by PostgreSQL as
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses PostgreSQL's rolpassword format strictly: exact separators, a positive
    /// decimal iteration count, canonical base64, keys of exactly 32 bytes.
    pub fn parse(s: &str) -> Result<Self, String> {
        parse_verifier(s).ok_or_else(|| {
            "a SCRAM verifier is SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> \
             with base64 salt and keys"
                .to_string()
        })
    }

    /// Derives the verifier PostgreSQL would store for `password` (SASLprep'd when valid
    /// for it). PBKDF2 needs at least one iteration, so 0 is taken as 1; the salt should be
    /// random and not empty (PostgreSQL's format has no empty salt).
    pub fn generate(password: &str, salt: &[u8], iterations: u32) -> Self {
        let iterations = iterations.max(1);
        let (stored_key, server_key) = verifier_keys(password.as_bytes(), salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key,
            server_key,
        }
    }

    /// A verifier with a fresh random salt and PostgreSQL's default parameters, for
    /// serving SCRAM to clients of a user configured with a plain password.
    pub fn from_password(password: &str) -> Self {
        let mut salt = [0u8; DEFAULT_SALT_LEN];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::generate(password, &salt, DEFAULT_ITERATIONS)
    }

    /// Checks a clear-text password against the verifier in constant time.
    pub fn verify_password(&self, password: &[u8]) -> bool {
        let (stored_key, _) = verifier_keys(password, &self.salt, self.iterations);
        stored_key.ct_eq(&self.stored_key).into()
    }
}

fn parse_verifier(s: &str) -> Option<ScramVerifier> {
    let rest = s.strip_prefix(SCRAM_PREFIX)?;
    let (parameters, keys) = rest.split_once('$')?;
    let (iterations, salt) = parameters.split_once(':')?;
    let (stored_key, server_key) = keys.split_once(':')?;
    let salt = decode_base64(salt.as_bytes(), "salt").ok()?;
    if salt.is_empty() {
        return None;
    }
    Some(ScramVerifier {
        iterations: parse_iterations(iterations.as_bytes()).ok()?,
        salt,
        stored_key: decode_key(stored_key.as_bytes(), "key").ok()?,
        server_key: decode_key(server_key.as_bytes(), "key").ok()?,
    })
}

impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCRAM_PREFIX}{}:{}${}:{}",
            self.iterations,
            encode_base64(&self.salt),
            encode_base64(&self.stored_key),
            encode_base64(&self.server_key)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Verifiers produced by PostgreSQL 15 (`SET password_encryption = 'scram-sha-256';
    /// CREATE ROLE … PASSWORD …; SELECT rolpassword FROM pg_authid`).
    const PG_PENCIL: &str = "SCRAM-SHA-256$4096:zz+LOEr8xAKHRDFIrlmI/g==$WZasJerWkNRi/hGAFc9gpEPOGIrahgxaVAMC5eFA02o=:2QMY4GdOqI+Hqe3yQg8whRgLqi7z+ynYO7gKCoG9mEE=";
    /// Password U&'\2168' (ROMAN NUMERAL NINE), which SASLprep turns into "IX".
    const PG_NFKC: &str = "SCRAM-SHA-256$4096:YYDIWF8Z3MSqmJICBRsYUg==$uo7lf/4lDyzQGXQdUN+oK4o5r/59LJBtQ4CRGhUkxrU=:lcW5xM3sPk5q8qG6n7uTmGSwdnw5Z66K0Xh3Ul2F6tE=";
    /// Password U&'I\00ADX': the soft hyphen is mapped to nothing.
    const PG_SOFT_HYPHEN: &str = "SCRAM-SHA-256$4096:D9/+a2uRJeeEzhpkTrQ6Gw==$HgirndWR2oTpchY5VaQEbyXkmPtxFNARdKcrHaF5FY4=:BUbe85f929j3+bXtryUbfeZuMBIqKyrrFK0xrKS+drw=";
    /// Password U&'pass\FFFDword': prohibited by SASLprep, so the raw bytes are used.
    const PG_PROHIBITED: &str = "SCRAM-SHA-256$4096:vpCTWjOV6X7OvyAeLDW8nw==$bdYYN+DNMZabcC2hgmQXaGqvRKe6OKWSxEbJPvH3jjg=:mch2zYoB+pz+kK4VVs+muFWlAyL/q1i6mEGe0e/jYBg=";

    fn regenerate(stored: &str, password: &str) -> ScramVerifier {
        let parsed = ScramVerifier::parse(stored).expect("PostgreSQL's verifier parses");
        ScramVerifier::generate(password, &parsed.salt, parsed.iterations)
    }

    #[test]
    fn postgres_verifiers_round_trip() {
        for stored in [PG_PENCIL, PG_NFKC, PG_SOFT_HYPHEN, PG_PROHIBITED] {
            let parsed = ScramVerifier::parse(stored).expect("parses");
            assert_eq!(parsed.iterations, 4096);
            assert_eq!(parsed.salt.len(), 16);
            assert_eq!(parsed.to_string(), stored);
        }
    }

    #[test]
    fn generate_matches_postgres() {
        let cases = [
            (PG_PENCIL, "pencil"),
            (PG_NFKC, "\u{2168}"),
            (PG_SOFT_HYPHEN, "I\u{00AD}X"),
            (PG_PROHIBITED, "pass\u{FFFD}word"),
        ];
        for (stored, password) in cases {
            assert_eq!(
                regenerate(stored, password).to_string(),
                stored,
                "{password:?}"
            );
        }
    }

    #[test]
    fn verify_password_against_postgres_verifier() {
        let verifier = ScramVerifier::parse(PG_PENCIL).unwrap();
        assert!(verifier.verify_password(b"pencil"));
        assert!(!verifier.verify_password(b"pencil "));
        assert!(ScramVerifier::parse(PG_NFKC)
            .unwrap()
            .verify_password(b"IX"));
    }

    #[test]
    fn generated_verifier_round_trips() {
        let verifier = ScramVerifier::from_password("hunter2");
        assert_eq!(verifier.salt.len(), DEFAULT_SALT_LEN);
        assert_eq!(verifier.iterations, DEFAULT_ITERATIONS);
        assert_eq!(ScramVerifier::parse(&verifier.to_string()), Ok(verifier));
        assert_eq!(ScramVerifier::generate("x", b"s", 0).iterations, 1);
    }

    #[test]
    fn malformed_verifiers_are_rejected() {
        let good = PG_PENCIL;
        assert!(ScramVerifier::parse(&good.replacen("SHA-256", "SHA-1", 1)).is_err());
        let broken = [
            good.replacen("4096", "0", 1),
            good.replacen("4096", "-1", 1),
            good.replacen("4096", "+4096", 1),
            good.replacen("4096", "99999999999", 1),
            good.replacen("4096", "", 1),
            good.replacen("4096:", "4096", 1),
            good.replacen("zz+LOEr8xAKHRDFIrlmI/g==", "", 1),
            good.replacen("zz+LOEr8xAKHRDFIrlmI/g==", "zz+LOEr8xAKHRDFIrlmI/g", 1),
            good.replacen("==$", "==", 1),
            good.replacen("o=:", "o=", 1),
            good.replacen("o=:", "o=::", 1),
            good.replacen("WZasJerWkNRi", "WZasJerWkNR", 1),
            format!("{good}$"),
            format!("{good}AAAA"),
            format!("{good}:"),
            "SCRAM-SHA-256$".to_string(),
            "SCRAM-SHA-256$$:".to_string(),
            "SCRAM-SHA-256$4096:é$é:é".to_string(),
        ];
        for bad in broken {
            assert!(ScramVerifier::parse(&bad).is_err(), "{bad}");
            assert!(Secret::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_classification() {
        assert!(matches!(Secret::parse(PG_PENCIL), Ok(Secret::Scram(_))));
        let md5 = "md53175bce1d3201d16594cebf9d7eb3f9d";
        assert_eq!(Secret::parse(md5), Ok(Secret::Md5(md5.into())));
        assert_eq!(
            Secret::parse("hunter2"),
            Ok(Secret::Plain("hunter2".into()))
        );
        // Not hash-shaped: a plain password that happens to start with "md5".
        assert_eq!(
            Secret::parse("md5rocks"),
            Ok(Secret::Plain("md5rocks".into()))
        );
        assert!(Secret::parse("").is_err());
        assert!(Secret::parse("md53175BCE1D3201D16594CEBF9D7EB3F9D").is_err());
        assert!(Secret::parse("md53175bce1d3201d16594cebf9d7eb3f9z").is_err());
        assert!(Secret::parse(&format!("md5{}", "é".repeat(16))).is_err());
    }

    #[test]
    fn verify_cleartext_for_every_form() {
        let plain = Secret::parse("postgres").unwrap();
        let md5 = Secret::parse("md53175bce1d3201d16594cebf9d7eb3f9d").unwrap();
        let scram = Secret::parse(PG_PENCIL).unwrap();
        assert!(plain.verify_cleartext("postgres", b"postgres"));
        assert!(!plain.verify_cleartext("postgres", b"postgre"));
        assert!(md5.verify_cleartext("postgres", b"postgres"));
        assert!(!md5.verify_cleartext("other", b"postgres"));
        assert!(scram.verify_cleartext("anyone", b"pencil"));
        assert!(!scram.verify_cleartext("anyone", b"pen"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "(SCRAM-SHA-256\\$|md5)?[0-9A-Za-z+/=:$]{0,120}") {
            let _ = Secret::parse(&text);
            let _ = ScramVerifier::parse(&text);
        }

        #[test]
        fn generated_verifiers_round_trip(
            password in ".{0,20}",
            salt in proptest::collection::vec(proptest::num::u8::ANY, 1..32),
            iterations in 1u32..4,
        ) {
            let verifier = ScramVerifier::generate(&password, &salt, iterations);
            proptest::prop_assert_eq!(ScramVerifier::parse(&verifier.to_string()), Ok(verifier));
        }
    }

    #[test]
    fn debug_hides_passwords() {
        let secret = Secret::parse("hunter2").unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
