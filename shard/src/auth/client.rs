//! The client side of password authentication, sans-IO: given one Authentication request
//! from a server, append the reply to `out`. Shared by the shards' backend connections
//! (glommio) and the control plane's blocking health probes, so both log in the same way.

use super::{md5, scram, ServerCredential};
use crate::codec::backend::Authentication;
use crate::codec::frontend;

/// Why the client side of a login cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ClientAuthError {
    /// The server wants a password and none is configured.
    #[error("server asks for a password and none is configured")]
    NoPassword,
    /// The server asks for a method the credential at hand cannot answer (pass-through
    /// keys or an md5 hash where the server wants something else).
    #[error("server asks for {asked}, which {held} cannot answer")]
    Unfit {
        asked: &'static str,
        held: &'static str,
    },
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
    pub credential: Option<&'a ServerCredential>,
    /// Set when the server starts SASL; kept for its later steps.
    pub scram: Option<scram::ScramClient>,
}

impl<'a> ClientAuth<'a> {
    pub fn new(user: &'a str, credential: Option<&'a ServerCredential>) -> Self {
        ClientAuth {
            user,
            credential,
            scram: None,
        }
    }

    fn unfit(&self, asked: &'static str) -> ClientAuthError {
        match self.credential {
            None => ClientAuthError::NoPassword,
            Some(held) => ClientAuthError::Unfit {
                asked,
                held: held.kind(),
            },
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
        match auth {
            Authentication::Ok => {}
            Authentication::CleartextPassword => match self.credential {
                Some(ServerCredential::Password(password)) => {
                    frontend::encode_password(out, password.as_bytes())
                }
                _ => return Err(self.unfit("a clear-text password")),
            },
            Authentication::Md5Password(salt) => {
                let response = match self.credential {
                    Some(ServerCredential::Password(password)) => {
                        md5::client_response(self.user, password, salt)
                    }
                    Some(ServerCredential::Md5Hash(hash)) => {
                        md5::client_response_from_hash(hash, salt)
                            .ok_or_else(|| self.unfit("md5"))?
                    }
                    _ => return Err(self.unfit("md5")),
                };
                frontend::encode_password(out, response.as_bytes());
            }
            Authentication::Sasl(mechanisms) => {
                if !mechanisms.into_iter().any(|m| m == scram::MECHANISM) {
                    return Err(ClientAuthError::NoMechanism);
                }
                let client = match self.credential {
                    Some(ServerCredential::Password(password)) => scram::ScramClient::new(password),
                    Some(ServerCredential::Scram(keys)) => {
                        scram::ScramClient::with_keys(keys.clone())
                    }
                    _ => return Err(self.unfit("SCRAM-SHA-256")),
                };
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
        let password = ServerCredential::Password("pw".into());
        let mut auth = ClientAuth::new("alice", Some(&password));
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
    fn an_md5_hash_answers_md5_and_nothing_else() {
        let mut cache = scram::SaltedPasswordCache::default();
        let hash = ServerCredential::Md5Hash(md5::stored_hash("alice", "pw"));
        let mut auth = ClientAuth::new("alice", Some(&hash));
        let mut out = Vec::new();
        let salt = [9, 8, 7, 6];
        auth.answer(Authentication::Md5Password(salt), &mut cache, &mut out)
            .unwrap();
        assert_eq!(
            password_sent(&out),
            md5::client_response("alice", "pw", salt).as_bytes()
        );
        assert!(matches!(
            auth.answer(Authentication::CleartextPassword, &mut cache, &mut out),
            Err(ClientAuthError::Unfit { .. })
        ));
        let mut frame = Vec::new();
        crate::codec::backend::write_auth_sasl(&mut frame, &[scram::MECHANISM]);
        let (tag, body, _) = split_message(&frame, 1 << 20).unwrap().unwrap();
        let crate::codec::backend::BackendMessage::Authentication(sasl) =
            crate::codec::backend::decode(tag, body).unwrap()
        else {
            panic!("not an authentication request");
        };
        assert!(matches!(
            auth.answer(sasl, &mut cache, &mut out),
            Err(ClientAuthError::Unfit { .. })
        ));
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
        let password = ServerCredential::Password("pw".into());
        let mut auth = ClientAuth::new("carol", Some(&password));
        auth.answer(request, &mut cache, &mut out).unwrap();
        let (tag, body, _) = split_message(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(tag, b'p');
        let initial = crate::codec::frontend::decode_sasl_initial(body).unwrap();
        assert_eq!(initial.mechanism, scram::MECHANISM);
        assert!(initial.data.is_some_and(|d| d.starts_with(b"n,,n=,r=")));
        assert!(auth.scram.is_some());
    }
}
