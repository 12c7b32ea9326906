//! What to answer when the backend cannot decide (FAILURE_MODE).

use std::{fmt, str::FromStr};

/// The policy for a backend failure: surface it as an error (Envoy's `failure_mode_deny` then
/// decides), or answer allowed / denied ourselves and flag the answer as degraded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    #[default]
    Error,
    Allow,
    Deny,
}

impl FailureMode {
    /// The answer to give instead of an error: `None` means "report the error".
    pub fn fallback_allowed(self) -> Option<bool> {
        match self {
            FailureMode::Error => None,
            FailureMode::Allow => Some(true),
            FailureMode::Deny => Some(false),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Error => "error",
            FailureMode::Allow => "allow",
            FailureMode::Deny => "deny",
        }
    }
}

impl fmt::Display for FailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailureMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(FailureMode::Error),
            "allow" => Ok(FailureMode::Allow),
            "deny" => Ok(FailureMode::Deny),
            other => Err(format!("expected error, allow or deny, got '{other}'")),
        }
    }
}
