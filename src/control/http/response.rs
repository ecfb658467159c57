//! Writing a [`Reply`] as HTTP/1.1 bytes: status line, the headers every response
//! carries, then the body (left out for HEAD, its length still announced).

use std::time::SystemTime;

use crate::control::admin::{Body, Reply};

/// The whole response, ready to write. `keep_alive` says whether the connection stays
/// open after it; `head_only` leaves the body out.
pub fn encode(reply: &Reply, keep_alive: bool, head_only: bool) -> Vec<u8> {
    let (body, content_type): (std::borrow::Cow<'_, str>, &str) = match &reply.body {
        Body::Json(value) => (value.to_string().into(), "application/json"),
        Body::Text(text) => (
            text.as_str().into(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
    };
    let mut out = Vec::with_capacity(body.len() + 256);
    let mut line = |name: &str, value: &str| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    line("Date", &http_date(SystemTime::now()));
    line("Content-Type", content_type);
    line("Content-Length", &body.len().to_string());
    line(
        "Connection",
        if keep_alive { "keep-alive" } else { "close" },
    );
    for (name, value) in &reply.headers {
        line(name, value);
    }
    let mut response =
        format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status)).into_bytes();
    response.append(&mut out);
    response.extend_from_slice(b"\r\n");
    if !head_only {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// The IMF-fixdate of RFC 9110, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = crate::control::admin::civil_from_days(days);
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[m as usize - 1],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dates_are_imf_fixdate() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            http_date(SystemTime::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }

    #[test]
    fn head_announces_the_length_without_the_body() {
        let reply = Reply::json(200, json!({"alive": true}));
        let full = String::from_utf8(encode(&reply, true, false)).unwrap();
        assert!(full.starts_with("HTTP/1.1 200 OK\r\n"), "{full}");
        assert!(full.contains("\r\nContent-Type: application/json\r\n"));
        assert!(full.contains("\r\nContent-Length: 14\r\n"));
        assert!(full.contains("\r\nConnection: keep-alive\r\n"));
        assert!(full.ends_with("\r\n\r\n{\"alive\":true}"));
        let head = String::from_utf8(encode(&reply, false, true)).unwrap();
        assert!(head.contains("\r\nContent-Length: 14\r\n"));
        assert!(head.contains("\r\nConnection: close\r\n"));
        assert!(head.ends_with("\r\n\r\n"));
    }
}
