//! PostgreSQL's md5 password scheme: the stored hash is md5(password || user) and a client
//! answers a 4-byte salt with md5(hex(stored hash) || salt), both written as "md5" + hex.

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

use super::Secret;

/// The hash PostgreSQL stores for `password`: "md5" + hex(md5(password || user)).
pub fn stored_hash(user: &str, password: &str) -> String {
    stored_hash_bytes(user.as_bytes(), password.as_bytes())
}

/// [`stored_hash`] for a password that need not be UTF-8 (one a client sent).
pub(crate) fn stored_hash_bytes(user: &[u8], password: &[u8]) -> String {
    md5_hex(&[password, user])
}

/// What a client answers to AuthenticationMD5Password.
pub fn client_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    salted_response(&stored_hash(user, password), salt)
}

/// What a client answers to AuthenticationMD5Password when only the stored "md5…" hash is
/// known: the md5 scheme lets the hash stand in for the password. `None` when `stored` is
/// not a valid md5 hash.
pub fn client_response_from_hash(stored: &str, salt: [u8; 4]) -> Option<String> {
    match Secret::parse(stored) {
        Ok(Secret::Md5(hash)) => Some(salted_response(&hash, salt)),
        _ => None,
    }
}

/// Checks a client's answer to AuthenticationMD5Password in constant time. Works for plain
/// and md5 secrets; a SCRAM verifier cannot check an md5 answer, so it never matches.
pub fn verify(secret: &Secret, user: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let stored = match secret {
        Secret::Plain(password) => stored_hash(user, password),
        Secret::Md5(hash) => hash.clone(),
        Secret::Scram(_) => return false,
    };
    salted_response(&stored, salt)
        .as_bytes()
        .ct_eq(response)
        .into()
}

/// "md5" + hex(md5(hex digits of `stored` || salt)), `stored` being "md5" + 32 hex digits.
fn salted_response(stored: &str, salt: [u8; 4]) -> String {
    let hex_digits = stored.strip_prefix("md5").unwrap_or(stored);
    md5_hex(&[hex_digits.as_bytes(), &salt])
}

/// "md5" + lowercase hex of the md5 of the concatenated parts.
fn md5_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for byte in hasher.finalize() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: [u8; 4] = [0x01, 0x02, 0x03, 0x04];

    #[test]
    fn stored_hash_matches_postgres() {
        assert_eq!(
            stored_hash("postgres", "postgres"),
            "md53175bce1d3201d16594cebf9d7eb3f9d"
        );
        // From PostgreSQL 15: SET password_encryption = 'md5'; CREATE ROLE md5user PASSWORD 'postgres'.
        assert_eq!(
            stored_hash("md5user", "postgres"),
            "md58a16933e120c845e84fe4514d0e592b3"
        );
    }

    #[test]
    fn client_response_is_salted_hash_of_stored_hash() {
        // md5("3175bce1d3201d16594cebf9d7eb3f9d" || 01 02 03 04), computed independently.
        let expected = md5_hex(&[b"3175bce1d3201d16594cebf9d7eb3f9d", &SALT]);
        assert_eq!(client_response("postgres", "postgres", SALT), expected);
        assert_eq!(expected.len(), 35);
        assert_eq!(
            client_response_from_hash("md53175bce1d3201d16594cebf9d7eb3f9d", SALT),
            Some(expected)
        );
        assert_eq!(client_response_from_hash("postgres", SALT), None);
    }

    #[test]
    fn verify_plain_and_md5_secrets() {
        let response = client_response("postgres", "postgres", SALT);
        let plain = Secret::parse("postgres").unwrap();
        let hashed = Secret::parse("md53175bce1d3201d16594cebf9d7eb3f9d").unwrap();
        for secret in [&plain, &hashed] {
            assert!(verify(secret, "postgres", SALT, response.as_bytes()));
            assert!(!verify(secret, "postgres", [0; 4], response.as_bytes()));
            assert!(!verify(secret, "postgres", SALT, b""));
            assert!(!verify(
                secret,
                "postgres",
                SALT,
                &response.as_bytes()[..34]
            ));
        }
        assert!(!verify(&plain, "other", SALT, response.as_bytes()));
    }

    #[test]
    fn verify_refuses_scram_secrets() {
        let verifier = crate::auth::secret::ScramVerifier::generate("postgres", b"salt", 1);
        let response = client_response("postgres", "postgres", SALT);
        assert!(!verify(
            &Secret::Scram(verifier),
            "postgres",
            SALT,
            response.as_bytes()
        ));
    }
}
