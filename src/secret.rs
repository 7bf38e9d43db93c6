//! Secrets as a type: redacted `Debug`, zeroized on drop, read only through [`Secret::expose`].

use std::fmt;
use zeroize::Zeroize;

/// A secret value. Its `Debug` prints a placeholder; its bytes are read through
/// [`Secret::expose`], a deliberately named accessor; it is zeroized on drop.
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// Reads the secret. Every call site is a place where the secret leaves its box.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize + Clone> Clone for Secret<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

impl<T: Zeroize> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Self::new(value)
    }
}

/// A secret string (tokens, passwords).
pub type SecretString = Secret<String>;
/// Secret bytes (keys).
pub type SecretBytes = Secret<Vec<u8>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretString::new("hunter2-very-secret".into());
        let shown = format!("{s:?} {:?}", Some(&s));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("REDACTED"));
        assert_eq!(s.expose(), "hunter2-very-secret");
    }
}
