//! Secrets — the HTTP bearer token, SASL and TLS key passwords — kept out of every log line,
//! error message and panic: a [`Secret`] never prints its value, and every secret the
//! process has seen is registered so that [`scrub`] blanks it from any text on its way to
//! stderr (log lines, the error `tally` exits with, panic messages), whatever put it there
//! (a parse error quoting the config line, a library's message).
//!
//! ```
//! use tally::secret::{register, scrub};
//! register("hunter2-very-secret");
//! assert_eq!(scrub("auth failed for hunter2-very-secret"), "auth failed for [redacted]");
//! ```

use std::io::Write;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// What a secret is shown as.
pub const REDACTED: &str = "[redacted]";

/// Secrets shorter than this are not scrubbed from text (a one-letter "secret" would blank
/// every such letter); they are refused as tokens anyway.
const MIN_SCRUBBED: usize = 4;

static SEEN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers `value` as a secret: [`scrub`] blanks it from now on.
pub fn register(value: &str) {
    if value.len() < MIN_SCRUBBED {
        return;
    }
    let mut seen = SEEN.write().unwrap_or_else(|p| p.into_inner());
    if !seen.iter().any(|s| s == value) {
        seen.push(value.to_string());
        // Longest first: a secret containing another is blanked whole.
        seen.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// `text` with every registered secret replaced by [`REDACTED`].
pub fn scrub(text: &str) -> String {
    let seen = SEEN.read().unwrap_or_else(|p| p.into_inner());
    let mut out = text.to_string();
    for s in seen.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}

/// Whether a config key names a secret (librdkafka's `sasl.password`, `ssl.key.password`,
/// `ssl.keystore.password`, `ssl.key.pem`, `sasl.oauthbearer.client.secret`,
/// `sasl.oauthbearer.config`, a JAAS config; tally's `token`).
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "jaas", "key.pem", "oauthbearer.config", "credential"].iter().any(|w| k.contains(w))
}

/// Registers the values of secret keys in config text before it is parsed, so that a parse
/// error quoting them is scrubbed too: every `key = value` line whose key names a secret.
pub fn register_from_config_text(text: &str) {
    // Inline tables hold several `key = value`s on one line.
    for line in text.lines().flat_map(|l| l.split([',', '{', '}'])) {
        let Some((key, value)) = line.split_once('=') else { continue };
        let key = key.trim().trim_matches(|c| c == '"' || c == '\'');
        if is_secret_key(key) {
            let value = value.trim();
            let value = value.strip_prefix(['"', '\'']).unwrap_or(value);
            let value = value.strip_suffix(['"', '\'']).unwrap_or(value);
            register(value);
        }
    }
}

/// Whether `given` equals `expected`, in time that does not depend on where they differ.
pub fn same(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A secret value from the config: shown as [`REDACTED`] by `Debug`, written as itself only
/// when the config is serialized (to a file).
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret (registered for [`scrub`]).
    pub fn new(value: impl Into<String>) -> Secret {
        let value = value.into();
        register(&value);
        Secret(value)
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Standard error with every registered secret scrubbed: the log writer.
#[derive(Clone, Copy, Default)]
pub struct ScrubbedStderr;

impl Write for ScrubbedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The formatter writes each event whole, so a secret is never split across calls.
        std::io::stderr().write_all(scrub(&String::from_utf8_lossy(buf)).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ScrubbedStderr {
    type Writer = ScrubbedStderr;
    fn make_writer(&'a self) -> Self::Writer {
        ScrubbedStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_from_text_and_never_debug_printed() {
        register_from_config_text("[kafka.properties]\n\"sasl.password\" = \"pw-from-the-file\nsasl.username = \"alice\"\n");
        assert_eq!(scrub("line 2: pw-from-the-file"), "line 2: [redacted]");
        assert_eq!(scrub("user alice"), "user alice", "only secret keys");
        let s = Secret::new("tok-tok-tok");
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(scrub("Bearer tok-tok-tok"), "Bearer [redacted]");
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
