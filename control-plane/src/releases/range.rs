//! HTTP `Range` for artifact downloads: one range of bytes (`bytes=a-b`, `bytes=a-`, `bytes=-n`), so that an
//! agent whose download was interrupted resumes where it stopped. Several ranges are answered as the whole
//! file (allowed by RFC 9110).

/// What to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// 200 with the whole file.
    Full,
    /// 206 with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416: the range lies outside the file.
    Unsatisfiable,
}

/// Interprets a `Range` header for a file of `len` bytes.
pub fn plan(header: Option<&str>, len: u64) -> Plan {
    let Some(h) = header.map(str::trim) else {
        return Plan::Full;
    };
    let Some(spec) = h.strip_prefix("bytes=") else {
        return Plan::Full; // another unit: ignored
    };
    if spec.contains(',') {
        return Plan::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Plan::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, true) => return Plan::Full,
        // Suffix: the last n bytes.
        (true, false) => match b.parse::<u64>() {
            Ok(0) => return Plan::Unsatisfiable,
            Ok(n) => Some((len.saturating_sub(n), len.checked_sub(1))),
            Err(_) => return Plan::Full,
        },
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else {
                return Plan::Full;
            };
            let end = if b.is_empty() {
                len.checked_sub(1)
            } else {
                match b.parse::<u64>() {
                    Ok(e) if e >= start => Some(e.min(len.saturating_sub(1))),
                    _ => return Plan::Full,
                }
            };
            Some((start, end))
        }
    };
    match parsed {
        Some((start, Some(end))) if start < len && start <= end => Plan::Partial { start, end },
        _ => Plan::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(plan(None, 10), Plan::Full);
        assert_eq!(plan(Some("bytes=0-"), 10), Plan::Partial { start: 0, end: 9 });
        assert_eq!(plan(Some("bytes=4-"), 10), Plan::Partial { start: 4, end: 9 });
        assert_eq!(plan(Some("bytes=2-5"), 10), Plan::Partial { start: 2, end: 5 });
        assert_eq!(plan(Some("bytes=2-500"), 10), Plan::Partial { start: 2, end: 9 });
        assert_eq!(plan(Some("bytes=-3"), 10), Plan::Partial { start: 7, end: 9 });
        assert_eq!(plan(Some("bytes=-30"), 10), Plan::Partial { start: 0, end: 9 });
        assert_eq!(plan(Some("bytes=10-"), 10), Plan::Unsatisfiable);
        assert_eq!(plan(Some("bytes=-0"), 10), Plan::Unsatisfiable);
        assert_eq!(plan(Some("bytes=0-"), 0), Plan::Unsatisfiable);
        assert_eq!(plan(Some("bytes=5-2"), 10), Plan::Full);
        assert_eq!(plan(Some("bytes=0-1,4-5"), 10), Plan::Full);
        assert_eq!(plan(Some("items=0-1"), 10), Plan::Full);
        assert_eq!(plan(Some("bytes=x-"), 10), Plan::Full);
    }
}
