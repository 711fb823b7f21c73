//! The device protocol's own words, shared by the server and the agent: the header that
//! carries the outcome of the last update, and that outcome's one text form. `no_std`, no
//! dependencies: a firmware could use it as it is.

#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

use alloc::string::String;
use core::fmt;
use core::str::FromStr;

/// Sent on the check-in after an update attempt; the value is an `UpdateResult`.
pub const UPDATE_RESULT_HEADER: &str = "x-otaforge-update-result";

/// Names the device's chip on a check-in when its header set does not: the ESP32 and
/// ESP8266 clients name every header after their chip, a W800 running the OTAForge client
/// sends `x-otaforge-chip: w800`. The server picks the image of that family from a release.
pub const CHIP_HEADER: &str = "x-otaforge-chip";

/// The longest version or reason the header carries; longer text is cut.
pub const MAX_TEXT: usize = 120;

/// What became of the last update, in the device's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateResult {
    /// The new firmware runs and was confirmed.
    Installed { version: String },
    /// The new firmware did not confirm itself; the device is back on `version`.
    RolledBack { version: String },
    /// The update did not get as far as a reboot.
    Failed { reason: String },
}

fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_TEXT)
        .collect::<String>()
        .trim()
        .into()
}

impl fmt::Display for UpdateResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpdateResult::Installed { version } => write!(f, "installed {}", clean(version)),
            UpdateResult::RolledBack { version } => write!(f, "rolled-back {}", clean(version)),
            UpdateResult::Failed { reason } => write!(f, "failed {}", clean(reason)),
        }
    }
}

/// A header value that is not `installed V`, `rolled-back V` or `failed REASON`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownResult;

impl fmt::Display for UnknownResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected `installed VERSION`, `rolled-back VERSION` or `failed REASON`")
    }
}

impl FromStr for UpdateResult {
    type Err = UnknownResult;

    fn from_str(s: &str) -> Result<Self, UnknownResult> {
        let s = s.trim();
        let (word, rest) = s.split_once(' ').unwrap_or((s, ""));
        let rest = clean(rest);
        match word {
            "installed" => Ok(UpdateResult::Installed { version: rest }),
            "rolled-back" => Ok(UpdateResult::RolledBack { version: rest }),
            "failed" => Ok(UpdateResult::Failed { reason: rest }),
            _ => Err(UnknownResult),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn round_trip() {
        for r in [
            UpdateResult::Installed {
                version: "1.2.3".into(),
            },
            UpdateResult::RolledBack {
                version: "1.2.2".into(),
            },
            UpdateResult::Failed {
                reason: "md5 mismatch".into(),
            },
        ] {
            assert_eq!(r.to_string().parse::<UpdateResult>(), Ok(r));
        }
    }

    #[test]
    fn text_is_cleaned_and_bounded() {
        let r = UpdateResult::Failed {
            reason: "bad\r\nheader\u{7f}".repeat(50),
        };
        let text = r.to_string();
        assert!(text.len() <= "failed ".len() + MAX_TEXT);
        assert!(text.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
        assert_eq!("nonsense".parse::<UpdateResult>(), Err(UnknownResult));
        assert_eq!(
            "failed".parse::<UpdateResult>(),
            Ok(UpdateResult::Failed {
                reason: String::new()
            })
        );
    }
}
