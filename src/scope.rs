//! Which devices a caller may touch: [`DeviceSet`], a set of device-id
//! patterns where `*` matches any run of characters (`greenhouse-*`,
//! `pump-7`, `*`). Pure string matching; the auth layer builds sets from a
//! token's scopes and the buffer filters readings by them.

use std::sync::Arc;

/// A set of devices: all of them, or those matching one of the patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DeviceSet {
    /// No restriction (also readings that carry no device id).
    #[default]
    All,
    /// Devices whose id matches one of these patterns. Empty: none.
    Patterns(Arc<[String]>),
}

impl DeviceSet {
    /// Whether `device_id` is in the set.
    pub fn allows(&self, device_id: &str) -> bool {
        match self {
            DeviceSet::All => true,
            DeviceSet::Patterns(patterns) => patterns.iter().any(|p| glob(p, device_id)),
        }
    }

    /// Whether the set holds no device at all.
    pub fn is_empty(&self) -> bool {
        matches!(self, DeviceSet::Patterns(p) if p.is_empty())
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters
/// (also none) and everything else matches itself. Linear in the lengths for
/// the patterns scopes use; at worst O(pattern × text), never exponential.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and where in the text it started matching.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = star {
            // Let the last `*` swallow one more byte and try again.
            pi = star_pi + 1;
            ti = star_ti + 1;
            star = Some((star_pi, star_ti + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_with_stars() {
        for (pattern, text) in [
            ("*", ""),
            ("*", "pump-7"),
            ("pump-7", "pump-7"),
            ("greenhouse-*", "greenhouse-"),
            ("greenhouse-*", "greenhouse-12"),
            ("*-7", "pump-7"),
            ("a*b*c", "aXXbYYc"),
            ("a**c", "ac"),
            ("é*", "été"),
        ] {
            assert!(glob(pattern, text), "{pattern} {text}");
        }
        for (pattern, text) in [
            ("pump-7", "pump-70"),
            ("greenhouse-*", "greenhous"),
            ("*-7", "pump-8"),
            ("a*b*c", "aXXbYY"),
            ("", "x"),
        ] {
            assert!(!glob(pattern, text), "{pattern} {text}");
        }
        let set = DeviceSet::Patterns(vec!["a-*".to_owned(), "b".to_owned()].into());
        assert!(set.allows("a-1") && set.allows("b") && !set.allows("c") && !set.allows(""));
        assert!(DeviceSet::All.allows(""));
        assert!(DeviceSet::Patterns(Vec::new().into()).is_empty());
    }
}
