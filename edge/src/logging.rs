//! The agent's own log lines on stderr: `<UTC time> <LEVEL> <message>`, one line each.

use std::io::Write;

/// Writes one log line to stderr (errors writing to stderr are ignored: there is nowhere else to report them).
pub fn log(level: &str, message: &str) {
    let line = format!(
        "{} {:<5} {}\n",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        level,
        message
    );
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

pub fn info(message: &str) {
    log("INFO", message)
}

pub fn warn(message: &str) {
    log("WARN", message)
}

pub fn error(message: &str) {
    log("ERROR", message)
}
