//! Message tags by name, so code outside the codec never spells a protocol letter: several
//! letters mean different messages in the two directions (`E` is Execute from a client
//! and ErrorResponse from a server; `C`, `D`, `S`, `H` likewise).

/// Messages a client sends.
pub mod fe {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const SYNC: u8 = b'S';
    pub const FLUSH: u8 = b'H';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const TERMINATE: u8 = b'X';
    /// PasswordMessage, SASLInitialResponse and SASLResponse.
    pub const PASSWORD: u8 = b'p';
}

/// Messages a server sends.
pub mod be {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_DATA: u8 = b'd';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const DATA_ROW: u8 = b'D';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const NO_DATA: u8 = b'n';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ROW_DESCRIPTION: u8 = b'T';
}

/// The Describe and Close targets.
pub mod target {
    pub const STATEMENT: u8 = b'S';
    pub const PORTAL: u8 = b'P';
}

/// ErrorResponse and NoticeResponse field codes.
pub mod field {
    pub const SEVERITY: u8 = b'S';
    /// The severity never translated (PostgreSQL 9.6 and later).
    pub const SEVERITY_NONLOCALIZED: u8 = b'V';
    pub const CODE: u8 = b'C';
    pub const MESSAGE: u8 = b'M';
    pub const FILE: u8 = b'F';
    pub const ROUTINE: u8 = b'R';
}

/// ReadyForQuery transaction status.
pub mod status {
    pub const IDLE: u8 = b'I';
    pub const IN_TRANSACTION: u8 = b'T';
    pub const FAILED: u8 = b'E';
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_exactly_the_tags_the_codec_accepts() {
        let frontend = [
            fe::QUERY,
            fe::PARSE,
            fe::BIND,
            fe::DESCRIBE,
            fe::EXECUTE,
            fe::CLOSE,
            fe::SYNC,
            fe::FLUSH,
            fe::COPY_DATA,
            fe::COPY_DONE,
            fe::COPY_FAIL,
            fe::FUNCTION_CALL,
            fe::TERMINATE,
            fe::PASSWORD,
        ];
        let backend = [
            be::AUTHENTICATION,
            be::BACKEND_KEY_DATA,
            be::BIND_COMPLETE,
            be::CLOSE_COMPLETE,
            be::COMMAND_COMPLETE,
            be::COPY_DATA,
            be::COPY_DONE,
            be::COPY_IN_RESPONSE,
            be::COPY_OUT_RESPONSE,
            be::COPY_BOTH_RESPONSE,
            be::DATA_ROW,
            be::EMPTY_QUERY_RESPONSE,
            be::ERROR_RESPONSE,
            be::FUNCTION_CALL_RESPONSE,
            be::NEGOTIATE_PROTOCOL_VERSION,
            be::NO_DATA,
            be::NOTICE_RESPONSE,
            be::NOTIFICATION_RESPONSE,
            be::PARAMETER_DESCRIPTION,
            be::PARAMETER_STATUS,
            be::PARSE_COMPLETE,
            be::PORTAL_SUSPENDED,
            be::READY_FOR_QUERY,
            be::ROW_DESCRIPTION,
        ];
        for (names, tags) in [
            (&frontend[..], crate::codec::frontend::TAGS),
            (&backend[..], crate::codec::backend::TAGS),
        ] {
            assert!(names.iter().all(|&t| tags.contains(t)));
            let accepted = (0..=255u8).filter(|&t| tags.contains(t)).count();
            assert_eq!(accepted, names.len());
        }
    }
}
