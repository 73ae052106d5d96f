//! Labels of sites and agents (`ring`, `environment`, or any key): what a label may look like, and the JSON
//! stored in `labels_json`. An agent's effective labels are its site's overlaid with its own
//! ([`crate::releases::desired::effective_labels`]).

use std::collections::BTreeMap;

/// Most labels per site or agent.
pub const MAX_LABELS: usize = 32;
/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 63;

/// A label key or value (also a ring name): 1-63 of `[A-Za-z0-9._-]`.
pub fn valid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks a whole set of labels and returns its stored JSON, or why it is refused.
pub fn to_json(labels: &BTreeMap<String, String>) -> Result<String, String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels ({} given)", labels.len()));
    }
    for (k, v) in labels {
        if !valid(k) || !valid(v) {
            return Err(format!(
                "label {k:?}={v:?}: keys and values are 1-{MAX_LABEL_LEN} letters, digits, '.', '_' or '-'"
            ));
        }
    }
    serde_json::to_string(labels).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn keys_and_values() {
        for ok in ["ring", "environment", "a", "A.b_c-9", &"x".repeat(63)] {
            assert!(valid(ok), "{ok:?}");
        }
        for bad in ["", &"x".repeat(64), "a b", "a/b", "a:b", "é", "a\n", "ring=x", "*"] {
            assert!(!valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn sets() {
        assert_eq!(to_json(&set(&[])).unwrap(), "{}");
        assert_eq!(
            to_json(&set(&[("ring", "pilot"), ("environment", "production")])).unwrap(),
            r#"{"environment":"production","ring":"pilot"}"#
        );
        assert!(to_json(&set(&[("ring", "")])).is_err());
        assert!(to_json(&set(&[("", "x")])).is_err());
        assert!(to_json(&set(&[("ring", "a b")])).unwrap_err().contains("ring"));
        let many: BTreeMap<String, String> = (0..33).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert!(to_json(&many).unwrap_err().contains("at most 32"));
        let enough: BTreeMap<String, String> = (0..32).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert!(to_json(&enough).is_ok());
    }
}
