//! Failed logins: why each failed (counted by reason), and damping for an address that
//! keeps failing — each further failure within a minute waits longer before its answer,
//! up to a bound, so guessing passwords gets slow while a typo costs nothing noticeable.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

/// Why a login was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    WrongPassword,
    /// A name no `[[users]]` entry (nor `auth_query`) knows (told apart only here, never
    /// to the client).
    UnknownUser,
    NoCertificate,
    CertificateMismatch,
    /// A plain connection where `tls.client_sslmode` requires TLS.
    NoEncryption,
    /// No line of `auth_hba_file` matches.
    NoHbaEntry,
    /// The matching line says `reject`.
    HbaReject,
    /// `auth_query` found the role, its `VALID UNTIL` in the past.
    PasswordExpired,
    /// `auth_query` found the role without a password the proxy can check.
    NoPassword,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 9] = [
        AuthFailure::WrongPassword,
        AuthFailure::UnknownUser,
        AuthFailure::NoCertificate,
        AuthFailure::CertificateMismatch,
        AuthFailure::NoEncryption,
        AuthFailure::NoHbaEntry,
        AuthFailure::HbaReject,
        AuthFailure::PasswordExpired,
        AuthFailure::NoPassword,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::WrongPassword => "wrong_password",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::NoCertificate => "no_certificate",
            AuthFailure::CertificateMismatch => "certificate_mismatch",
            AuthFailure::NoEncryption => "no_encryption",
            AuthFailure::NoHbaEntry => "no_hba_entry",
            AuthFailure::HbaReject => "hba_reject",
            AuthFailure::PasswordExpired => "password_expired",
            AuthFailure::NoPassword => "no_password",
        }
    }
}

/// Failures within this window count towards an address's delay.
const WINDOW: Duration = Duration::from_secs(60);
/// The first failures answer at once; then the delay doubles from `FIRST_DELAY`.
const FREE_FAILURES: u32 = 3;
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(2);
/// Addresses remembered at once; beyond it, stale ones are forgotten (then all).
const MAX_ADDRESSES: usize = 65_536;

/// One shard's memory of recent failures by client address.
#[derive(Default)]
pub struct Failures {
    by_address: HashMap<IpAddr, (u32, Instant)>,
}

impl Failures {
    /// Records a failure from `addr` and returns how long to wait before answering it.
    pub fn record(&mut self, addr: IpAddr) -> Duration {
        let now = Instant::now();
        if self.by_address.len() >= MAX_ADDRESSES {
            self.by_address
                .retain(|_, (_, last)| now.duration_since(*last) < WINDOW);
            if self.by_address.len() >= MAX_ADDRESSES {
                self.by_address.clear();
            }
        }
        let entry = self.by_address.entry(addr).or_insert((0, now));
        if now.duration_since(entry.1) >= WINDOW {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        delay_after(entry.0)
    }
}

/// The wait before answering the `n`th failure in a row.
fn delay_after(n: u32) -> Duration {
    if n <= FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (n - FREE_FAILURES - 1).min(16);
    (FIRST_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_after_a_few_failures_and_is_bounded() {
        assert_eq!(delay_after(1), Duration::ZERO);
        assert_eq!(delay_after(3), Duration::ZERO);
        assert_eq!(delay_after(4), Duration::from_millis(100));
        assert_eq!(delay_after(5), Duration::from_millis(200));
        assert_eq!(delay_after(50), MAX_DELAY);
        let mut failures = Failures::default();
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(failures.record(addr), Duration::ZERO);
        }
        assert!(failures.record(addr) > Duration::ZERO);
        assert_eq!(failures.record(other), Duration::ZERO, "per address");
    }
}
