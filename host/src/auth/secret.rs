//! Secrets (the HMAC key, the API key, the admin token): read from a file or the environment,
//! compared in constant time, never printed.

use std::fmt;
use std::path::Path;

use subtle::ConstantTimeEq as _;

/// Bytes that must not leak: `Debug` shows only their length, and comparisons take the same
/// time whatever the bytes are.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the secret file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the secret {what} is empty")]
    Empty { what: String },
}

impl Secret {
    /// A secret from its bytes; empty is refused (`what` names it in the error).
    pub fn new(bytes: impl Into<Vec<u8>>, what: &str) -> Result<Self, SecretError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(SecretError::Empty { what: what.to_owned() });
        }
        Ok(Secret(bytes.into_boxed_slice()))
    }

    /// The raw contents of `path`; one trailing newline (`\n` or `\r\n`) is ignored, so a
    /// file written by `echo` works.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let display = path.display().to_string();
        let mut bytes =
            std::fs::read(path).map_err(|source| SecretError::Read { path: display.clone(), source })?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        Secret::new(bytes, &format!("in {display}"))
    }

    /// The secret's bytes, for handing to a crypto library.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Whether `given` is this secret, in time that depends only on the lengths.
    pub fn matches(&self, given: &[u8]) -> bool {
        bool::from(self.0.as_ref().ct_eq(given))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_drops_one_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, b"abc\n\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), b"abc\n");
        std::fs::write(&path, b"abc\r\n").unwrap();
        assert_eq!(Secret::from_file(&path).unwrap().expose(), b"abc");
        std::fs::write(&path, b"\n").unwrap();
        assert!(matches!(Secret::from_file(&path), Err(SecretError::Empty { .. })));
        assert!(matches!(Secret::from_file(&dir.path().join("missing")), Err(SecretError::Read { .. })));
    }

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = Secret::new("hunter2", "test").unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter3"));
        assert!(!s.matches(b"hunter"));
    }
}
