//! The `Range` request header (single byte ranges), as a pure parser.

/// What to send for a request over a body of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No `Range` header: the whole body, 200.
    Full,
    /// Bytes `start..=end` (inclusive, both within the body), 206.
    Partial { start: u64, end: u64 },
    /// A well-formed range that does not overlap the body: 416.
    Unsatisfiable,
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n`. Errors name what is malformed.
pub fn parse(header: Option<&str>, len: u64) -> Result<RangeRequest, String> {
    let Some(header) = header else {
        return Ok(RangeRequest::Full);
    };
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or_else(|| format!("unsupported Range {header:?}: only bytes=START-END is served"))?
        .trim();
    if spec.contains(',') {
        return Err(format!(
            "unsupported Range {header:?}: one range per request"
        ));
    }
    let (first, last) = spec
        .split_once('-')
        .ok_or_else(|| format!("malformed Range {header:?}: expected bytes=START-END"))?;
    let number = |s: &str| -> Result<u64, String> {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("malformed Range {header:?}: {s:?} is not a byte position"))
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range: the last n bytes.
        let n = number(last)?;
        if n == 0 || len == 0 {
            return Ok(RangeRequest::Unsatisfiable);
        }
        let start = len.saturating_sub(n);
        return Ok(RangeRequest::Partial {
            start,
            end: len - 1,
        });
    }
    let start = number(first)?;
    let end = if last.is_empty() {
        u64::MAX
    } else {
        number(last)?
    };
    if end < start {
        return Err(format!(
            "malformed Range {header:?}: the end is before the start"
        ));
    }
    if start >= len {
        return Ok(RangeRequest::Unsatisfiable);
    }
    Ok(RangeRequest::Partial {
        start,
        end: end.min(len - 1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse(None, 10), Ok(RangeRequest::Full));
        assert_eq!(
            parse(Some("bytes=0-15"), 100),
            Ok(RangeRequest::Partial { start: 0, end: 15 })
        );
        assert_eq!(
            parse(Some("bytes=90-200"), 100),
            Ok(RangeRequest::Partial { start: 90, end: 99 })
        );
        assert_eq!(
            parse(Some("bytes=50-"), 100),
            Ok(RangeRequest::Partial { start: 50, end: 99 })
        );
        assert_eq!(
            parse(Some("bytes=-10"), 100),
            Ok(RangeRequest::Partial { start: 90, end: 99 })
        );
        assert_eq!(
            parse(Some("bytes=100-"), 100),
            Ok(RangeRequest::Unsatisfiable)
        );
        assert!(parse(Some("bytes=5-1"), 100).is_err());
        assert!(parse(Some("bytes=a-b"), 100).is_err());
        assert!(parse(Some("items=0-1"), 100).is_err());
        assert!(parse(Some("bytes=0-1,5-6"), 100).is_err());
        assert!(parse(Some("bytes=99999999999999999999999-"), 100).is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_out_of_bounds(header in ".{0,40}", len in 0u64..10_000) {
            if let Ok(RangeRequest::Partial { start, end }) = parse(Some(&header), len) {
                proptest::prop_assert!(start <= end && end < len);
            }
        }

        #[test]
        fn explicit_ranges(start in 0u64..5000, extra in 0u64..5000, len in 1u64..5000) {
            let end = start + extra;
            let got = parse(Some(&format!("bytes={start}-{end}")), len).unwrap();
            if start >= len {
                proptest::prop_assert_eq!(got, RangeRequest::Unsatisfiable);
            } else {
                proptest::prop_assert_eq!(got, RangeRequest::Partial { start, end: end.min(len - 1) });
            }
        }
    }
}
