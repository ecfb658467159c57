//! The client side of password authentication, sans-IO: given one Authentication request
//! from a server, append the reply to `out`. Shared by the shards' backend connections
//! (glommio) and the control plane's blocking health probes, so both log in the same way.

use super::{md5, scram};
use crate::codec::backend::Authentication;
use crate::codec::frontend;

/// Why the client side of a login cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ClientAuthError {
    /// The server wants a password and none is configured.
    #[error("server asks for a password and none is configured")]
    NoPassword,
    #[error("server offers no supported SASL mechanism")]
    NoMechanism,
    #[error("server asks for an unsupported authentication method")]
    Unsupported,
    /// A SASL step arrived before the exchange started: a protocol violation.
    #[error("{0}")]
    OutOfOrder(&'static str),
    #[error("{0}")]
    Scram(#[from] scram::ScramError),
}

/// One login's credentials and SCRAM progress.
pub struct ClientAuth<'a> {
    pub user: &'a str,
    pub password: Option<&'a str>,
    /// Set when the server starts SASL; kept for its later steps.
    pub scram: Option<scram::ScramClient>,
}

impl<'a> ClientAuth<'a> {
    pub fn new(user: &'a str, password: Option<&'a str>) -> Self {
        ClientAuth {
            user,
            password,
            scram: None,
        }
    }

    /// Appends the answer to `auth` to `out` (nothing for AuthenticationOk and SASL
    /// final). `cache` keeps salted passwords of this credential across logins.
    pub fn answer(
        &mut self,
        auth: Authentication<'_>,
        cache: &mut scram::SaltedPasswordCache,
        out: &mut Vec<u8>,
    ) -> Result<(), ClientAuthError> {
        let password = self.password.ok_or(ClientAuthError::NoPassword);
        match auth {
            Authentication::Ok => {}
            Authentication::CleartextPassword => {
                frontend::encode_password(out, password?.as_bytes())
            }
            Authentication::Md5Password(salt) => {
                let response = md5::client_response(self.user, password?, salt);
                frontend::encode_password(out, response.as_bytes());
            }
            Authentication::Sasl(mechanisms) => {
                if !mechanisms.into_iter().any(|m| m == scram::MECHANISM) {
                    return Err(ClientAuthError::NoMechanism);
                }
                let client = scram::ScramClient::new(password?);
                frontend::encode_sasl_initial(out, scram::MECHANISM, &client.client_first());
                self.scram = Some(client);
            }
            Authentication::SaslContinue(data) => {
                let client = self
                    .scram
                    .as_mut()
                    .ok_or(ClientAuthError::OutOfOrder("SASL continue without start"))?;
                let reply = client.server_first_cached(data, cache)?;
                frontend::encode_sasl_response(out, &reply);
            }
            Authentication::SaslFinal(data) => {
                let client = self
                    .scram
                    .as_ref()
                    .ok_or(ClientAuthError::OutOfOrder("SASL final without start"))?;
                client.server_final(data)?;
            }
            _ => return Err(ClientAuthError::Unsupported),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::frame::split_message;

    fn password_sent(out: &[u8]) -> Vec<u8> {
        let (tag, body, _) = split_message(out, 1 << 20).unwrap().unwrap();
        assert_eq!(tag, b'p');
        crate::codec::frontend::decode_password(body)
            .unwrap()
            .to_vec()
    }

    #[test]
    fn cleartext_and_md5_send_the_password_forms_postgres_expects() {
        let mut cache = scram::SaltedPasswordCache::default();
        let mut auth = ClientAuth::new("alice", Some("pw"));
        let mut out = Vec::new();
        auth.answer(Authentication::CleartextPassword, &mut cache, &mut out)
            .unwrap();
        assert_eq!(password_sent(&out), b"pw");
        out.clear();
        let salt = [1, 2, 3, 4];
        auth.answer(Authentication::Md5Password(salt), &mut cache, &mut out)
            .unwrap();
        assert_eq!(
            password_sent(&out),
            md5::client_response("alice", "pw", salt).as_bytes()
        );
    }

    #[test]
    fn ok_sends_nothing_and_missing_password_or_method_fail() {
        let mut cache = scram::SaltedPasswordCache::default();
        let mut out = Vec::new();
        let mut auth = ClientAuth::new("bob", None);
        auth.answer(Authentication::Ok, &mut cache, &mut out)
            .unwrap();
        assert!(out.is_empty());
        assert!(matches!(
            auth.answer(Authentication::CleartextPassword, &mut cache, &mut out),
            Err(ClientAuthError::NoPassword)
        ));
        assert!(matches!(
            auth.answer(Authentication::Gss, &mut cache, &mut out),
            Err(ClientAuthError::Unsupported)
        ));
        assert!(matches!(
            auth.answer(Authentication::SaslFinal(b"v=x"), &mut cache, &mut out),
            Err(ClientAuthError::OutOfOrder(_))
        ));
    }

    #[test]
    fn sasl_start_sends_a_scram_initial_response() {
        use crate::codec::backend::{decode, write_auth_sasl, BackendMessage};
        let mut frame = Vec::new();
        write_auth_sasl(&mut frame, &["OTHER", scram::MECHANISM]);
        let (tag, body, _) = split_message(&frame, 1 << 20).unwrap().unwrap();
        let BackendMessage::Authentication(request) = decode(tag, body).unwrap() else {
            panic!("not an authentication request");
        };
        let mut cache = scram::SaltedPasswordCache::default();
        let mut out = Vec::new();
        let mut auth = ClientAuth::new("carol", Some("pw"));
        auth.answer(request, &mut cache, &mut out).unwrap();
        let (tag, body, _) = split_message(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(tag, b'p');
        let initial = crate::codec::frontend::decode_sasl_initial(body).unwrap();
        assert_eq!(initial.mechanism, scram::MECHANISM);
        assert!(initial.data.is_some_and(|d| d.starts_with(b"n,,n=,r=")));
        assert!(auth.scram.is_some());
    }
}
