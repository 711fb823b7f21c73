//! Compiler output read into diagnostics: gcc's `file:line:col: severity: message` lines,
//! mapped back from the build folder's copy to the sketch's own file names.

use otaforge_store::model::Diagnostic;

/// Finds `path:line[:col]: (error|warning|note): message` lines. `rename` maps a path as
/// the compiler printed it to the sketch file it came from (or `None` for files outside the
/// sketch, such as the core, which are still reported under their base name).
pub fn parse(output: &str, rename: impl Fn(&str) -> Option<String>) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = Vec::new();
    for line in output.lines() {
        let Some(d) = parse_line(line, &rename) else {
            continue;
        };
        if !out.contains(&d) {
            out.push(d);
        }
        if out.len() >= 200 {
            break;
        }
    }
    out
}

fn parse_line(line: &str, rename: &impl Fn(&str) -> Option<String>) -> Option<Diagnostic> {
    for severity in ["error", "warning", "note", "fatal error"] {
        let marker = format!(": {severity}: ");
        let Some(at) = line.find(&marker) else {
            continue;
        };
        let location = &line[..at];
        let message = line[at + marker.len()..].trim().to_string();
        // location = path:line[:col]; the path itself may contain ':' only on Windows.
        let mut parts = location.rsplitn(3, ':');
        let last = parts.next()?;
        let middle = parts.next()?;
        let (path, line_no, column) = match (middle.parse::<u32>(), last.parse::<u32>()) {
            (Ok(l), Ok(c)) => (parts.next()?, l, c),
            (Err(_), Ok(l)) => (location.rsplit_once(':')?.0, l, 0),
            _ => return None,
        };
        let file =
            rename(path).unwrap_or_else(|| path.rsplit('/').next().unwrap_or(path).to_string());
        let severity = if severity == "fatal error" {
            "error"
        } else {
            severity
        };
        return Some(Diagnostic {
            file,
            line: line_no,
            column,
            severity: severity.to_string(),
            message,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcc_lines() {
        let out = "\
/tmp/b/sketch/sketch.ino: In function 'void setup()':
/tmp/b/sketch/sketch.ino:5:3: error: 'foo' was not declared in this scope
   foo();
   ^~~
/tmp/b/sketch/util.h:2:9: warning: unused variable 'x' [-Wunused-variable]
/tmp/b/sketch/sketch.ino:1:10: fatal error: /etc/passwd: No such file or directory
collect2: error: ld returned 1 exit status
";
        let d = parse(out, |p| {
            p.strip_prefix("/tmp/b/sketch/").map(|f| {
                if f == "sketch.ino" {
                    "blink.ino".to_string()
                } else {
                    f.to_string()
                }
            })
        });
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!(
            (d[0].file.as_str(), d[0].line, d[0].column),
            ("blink.ino", 5, 3)
        );
        assert_eq!(d[0].severity, "error");
        assert!(d[0].message.contains("'foo' was not declared"));
        assert_eq!(
            (d[1].file.as_str(), d[1].severity.as_str()),
            ("util.h", "warning")
        );
        assert_eq!((d[2].line, d[2].severity.as_str()), (1, "error"));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in ".{0,300}") {
            let _ = parse(&s, |_| None);
        }
    }
}
