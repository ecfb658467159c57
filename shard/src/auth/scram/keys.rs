//! The key derivations of RFC 5802 §3 for SCRAM-SHA-256, shared by the stored verifier, the
//! server and the client so all three compute exactly the same bytes.

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// Length of every SCRAM-SHA-256 key, signature and proof.
pub(crate) const KEY_LEN: usize = 32;

/// A SHA-256 sized key, signature or proof.
pub(crate) type Key = [u8; KEY_LEN];

/// HMAC-SHA-256 of the concatenation of `parts`, so callers need not build the
/// AuthMessage in a buffer.
pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub(crate) fn sha256(data: &[u8]) -> Key {
    Sha256::digest(data).into()
}

/// SaltedPassword := Hi(Normalize(password), salt, i), with `password` already normalised.
pub(crate) fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> Key {
    let mut salted = [0u8; KEY_LEN];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
    salted
}

pub(crate) fn client_key(salted_password: &Key) -> Key {
    hmac(salted_password, &[b"Client Key"])
}

pub(crate) fn server_key(salted_password: &Key) -> Key {
    hmac(salted_password, &[b"Server Key"])
}

/// (StoredKey, ServerKey) of a clear-text password: what a verifier stores.
pub(crate) fn verifier_keys(password: &[u8], salt: &[u8], iterations: u32) -> (Key, Key) {
    let salted = salted_password(&normalize_password(password), salt, iterations);
    (sha256(&client_key(&salted)), server_key(&salted))
}

pub(crate) fn xor(a: &Key, b: &Key) -> Key {
    let mut out = [0u8; KEY_LEN];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = x ^ y;
    }
    out
}

/// PostgreSQL's Normalize(): SASLprep when the password is UTF-8 and valid for SASLprep,
/// otherwise the raw bytes, so passwords that SASLprep rejects still work as they do with
/// PostgreSQL itself.
pub(crate) fn normalize_password(password: &[u8]) -> Cow<'_, [u8]> {
    let Ok(text) = std::str::from_utf8(password) else {
        return Cow::Borrowed(password);
    };
    match stringprep::saslprep(text) {
        Ok(Cow::Owned(prepared)) => Cow::Owned(prepared.into_bytes()),
        Ok(Cow::Borrowed(_)) | Err(_) => Cow::Borrowed(password),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_keeps_ascii_unchanged() {
        assert_eq!(normalize_password(b"pencil").as_ref(), b"pencil");
    }

    #[test]
    fn normalize_applies_saslprep() {
        // U+2168 ROMAN NUMERAL NINE becomes "IX" under NFKC; U+00AD SOFT HYPHEN maps to nothing.
        assert_eq!(normalize_password("\u{2168}".as_bytes()).as_ref(), b"IX");
        assert_eq!(normalize_password("I\u{00AD}X".as_bytes()).as_ref(), b"IX");
    }

    #[test]
    fn normalize_falls_back_to_raw_bytes() {
        let prohibited = "pass\u{FFFD}word".as_bytes();
        assert_eq!(normalize_password(prohibited).as_ref(), prohibited);
        let not_utf8 = b"pass\xffword";
        assert_eq!(normalize_password(not_utf8).as_ref(), not_utf8);
    }
}
