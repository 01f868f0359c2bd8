//! Comparing secrets (the worker token) without leaking where they differ.

/// Byte-wise comparison whose time does not depend on where the inputs differ (shared with
/// the worker's web tunnel).
pub(crate) use flare_api::same_secret;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"token", b"token"));
        assert!(!same_secret(b"token", b"tokem"));
        assert!(!same_secret(b"token", b"token2"));
        assert!(!same_secret(b"", b"x"));
    }
}
