//! What OTAForge knows of arduino-cli 1.x, read from its sources (`internal/cli/compile`,
//! `internal/cli/feedback`, `commands/service_compile.go`, `internal/cli/configuration`):
//! where its folders are, which version runs (the build cache works differently from 1.1.0
//! on), which cores are installed, and how its text output reports a failed build.

use std::path::{Path, PathBuf};

/// The jail's fixed places for the binary and its three folders, wherever they are on the host.
pub const JAIL_CLI: &str = "/opt/arduino-cli/arduino-cli";
pub const JAIL_DATA: &str = "/arduino/data";
pub const JAIL_DOWNLOADS: &str = "/arduino/downloads";
pub const JAIL_USER: &str = "/arduino/user";

/// `arduino-cli version --json`: `{"Application":"arduino-cli","VersionString":"1.1.1",...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub text: String,
    /// (major, minor, patch); `None` for development builds (`git-snapshot`, `nightly-…`).
    pub number: Option<(u64, u64, u64)>,
}

impl Version {
    pub fn parse_json(json: &str) -> Result<Version, String> {
        let value: serde_json::Value = serde_json::from_str(json.trim())
            .map_err(|e| format!("`arduino-cli version --json` printed no JSON ({e})"))?;
        let text = value["VersionString"]
            .as_str()
            .ok_or("`arduino-cli version --json` has no VersionString")?
            .to_string();
        let core = text.split(['-', '+']).next().unwrap_or_default();
        let mut parts = core.split('.').map(|p| p.parse::<u64>());
        let number = match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(a)), Some(Ok(b)), Some(Ok(c))) => Some((a, b, c)),
            _ => None,
        };
        Ok(Version { text, number })
    }

    /// From 1.1.0 on `--build-path` turns every build cache off and `--build-cache-path` is
    /// ignored: the cache is set by `ARDUINO_BUILD_CACHE_PATH` and `_EXTRA_PATHS` instead.
    /// Development builds are taken to be current.
    pub fn caches_by_environment(&self) -> bool {
        self.number.is_none_or(|n| n >= (1, 1, 0))
    }
}

/// One installed core from `arduino-cli core list --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `vendor:arch`, such as `esp32:esp32`.
    pub id: String,
    pub version: String,
    /// (FQBN, name) of the boards of the installed release.
    pub boards: Vec<(String, String)>,
}

/// `{"platforms":[{"id":"esp32:esp32","installed_version":"3.0.7","releases":{"3.0.7":
/// {"boards":[{"name":..,"fqbn":..}]}}}]}` (arduino-cli 1.x; 0.x printed a bare list with
/// `installed`, also read).
pub fn parse_core_list(json: &str) -> Result<Vec<Platform>, String> {
    let value: serde_json::Value = serde_json::from_str(json.trim())
        .map_err(|e| format!("`arduino-cli core list --json` printed no JSON ({e})"))?;
    let list = value
        .get("platforms")
        .unwrap_or(&value)
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    for p in list {
        let Some(id) = p["id"].as_str() else { continue };
        let version = p["installed_version"]
            .as_str()
            .or_else(|| p["installed"].as_str())
            .unwrap_or_default()
            .to_string();
        if version.is_empty() {
            continue;
        }
        let boards = p["releases"][&version]["boards"]
            .as_array()
            .or_else(|| p["boards"].as_array())
            .map(|boards| {
                boards
                    .iter()
                    .filter_map(|b| {
                        Some((
                            b["fqbn"].as_str()?.to_string(),
                            b["name"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Platform {
            id: id.to_string(),
            version,
            boards,
        });
    }
    Ok(out)
}

/// `vendor:arch` of an FQBN.
pub fn platform_of(fqbn: &str) -> String {
    fqbn.split(':').take(2).collect::<Vec<_>>().join(":")
}

/// arduino-cli's data folder (cores and tools, `inventory.yaml`), downloads (staging) and
/// user folder (the sketchbook's libraries).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirs {
    pub data: PathBuf,
    pub downloads: PathBuf,
    pub user: PathBuf,
}

impl Dirs {
    /// arduino-cli's defaults on Linux: `~/.arduino15`, its `staging`, `~/Arduino`.
    pub fn defaults(home: &Path) -> Dirs {
        let data = home.join(".arduino15");
        Dirs {
            downloads: data.join("staging"),
            data,
            user: home.join("Arduino"),
        }
    }

    /// Fills what is not set from `arduino-cli config dump --json`
    /// (`{"config":{"directories":{"data":..,"downloads":..,"user":..}}}`), then the defaults.
    pub fn resolve(
        data: Option<PathBuf>,
        downloads: Option<PathBuf>,
        user: Option<PathBuf>,
        config_dump: Option<&str>,
        home: &Path,
    ) -> Dirs {
        let dumped: serde_json::Value = config_dump
            .and_then(|s| serde_json::from_str(s.trim()).ok())
            .unwrap_or_default();
        let from_dump = |key: &str| {
            dumped["config"]["directories"][key]
                .as_str()
                .filter(|s| Path::new(s).is_absolute())
                .map(PathBuf::from)
        };
        let defaults = Dirs::defaults(home);
        let data = data.or_else(|| from_dump("data")).unwrap_or(defaults.data);
        Dirs {
            downloads: downloads
                .or_else(|| from_dump("downloads"))
                .unwrap_or_else(|| data.join("staging")),
            user: user.or_else(|| from_dump("user")).unwrap_or(defaults.user),
            data,
        }
    }
}

/// The build cache for one arduino-cli run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cache {
    /// arduino-cli < 1.1: `--build-path` and `--build-cache-path` flags.
    Flags { build: String, cache: String },
    /// arduino-cli >= 1.1: the sketch builds under `ARDUINO_BUILD_CACHE_PATH` (writable, this
    /// build's own) and reuses the compiled core from `ARDUINO_BUILD_CACHE_EXTRA_PATHS`.
    Environment {
        writable: String,
        read_only: Option<String>,
    },
}

/// The environment of every arduino-cli run: its folders at `dirs` (the jail's or the
/// host's), no update check, and the cache when it is set that way.
pub fn environment(dirs: (&str, &str, &str), cache: Option<&Cache>) -> Vec<(String, String)> {
    let mut env = vec![
        ("ARDUINO_DIRECTORIES_DATA".to_string(), dirs.0.to_string()),
        ("ARDUINO_DIRECTORIES_DOWNLOADS".into(), dirs.1.to_string()),
        ("ARDUINO_DIRECTORIES_USER".into(), dirs.2.to_string()),
        ("ARDUINO_UPDATER_ENABLE_NOTIFICATION".into(), "false".into()),
    ];
    if let Some(Cache::Environment {
        writable,
        read_only,
    }) = cache
    {
        env.push(("ARDUINO_BUILD_CACHE_PATH".into(), writable.clone()));
        if let Some(extra) = read_only {
            // A list setting read from the environment is split at spaces.
            env.push(("ARDUINO_BUILD_CACHE_EXTRA_PATHS".into(), extra.clone()));
        }
    }
    env
}

/// Removes terminal colour codes (`ESC [ … letter`), which some platforms turn on for gcc.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The reason arduino-cli gives on standard error when a run fails, in words for the user:
/// in text mode a failed build ends with `Error during build: …` (and, for a missing core,
/// `Try running …`); other fatal errors are a line of their own; a fatal error in JSON mode
/// is `{"error": …}`. `None` when the only reason is the compiler's exit status (the
/// diagnostics say the rest).
pub fn failure_message(stderr: &str) -> Option<String> {
    let stderr = strip_ansi(stderr);
    let cap = |s: &str| -> String { s.trim().chars().take(2000).collect() };
    if let Some(at) = stderr.rfind("Error during build: ") {
        let rest = cap(&stderr[at + "Error during build: ".len()..]);
        let only_status = rest.starts_with("exit status") && !rest.contains('\n');
        return (!only_status).then_some(rest);
    }
    if let Some(start) = stderr.find('{')
        && let Ok(value) = serde_json::from_str::<serde_json::Value>(stderr[start..].trim_end())
        && let Some(error) = value["error"].as_str()
    {
        return Some(cap(error));
    }
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with("Error") || l.starts_with("Invalid") || l.contains("not found"))
        .map(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let v = Version::parse_json(
            r#"{"Application":"arduino-cli","VersionString":"1.1.1","Commit":"fa6eafcb","Status":"alpha","Date":"2024-11-29T09:34:56Z"}"#,
        )
        .unwrap();
        assert_eq!(v.number, Some((1, 1, 1)));
        assert!(v.caches_by_environment());
        for (text, by_env) in [
            ("1.0.4", false),
            ("0.35.3", false),
            ("1.1.0-rc.1", true),
            ("1.5.2", true),
            ("git-snapshot", true),
            ("nightly-20250101", true),
        ] {
            let v = Version::parse_json(&format!(r#"{{"VersionString":"{text}"}}"#)).unwrap();
            assert_eq!(v.caches_by_environment(), by_env, "{text}");
        }
        assert!(Version::parse_json("arduino-cli  Version: 1.1.1").is_err());
        assert!(Version::parse_json("{}").is_err());
    }

    #[test]
    fn core_lists() {
        // The shape of arduino-cli 1.x `core list --json` (internal/cli/feedback/result).
        let json = r#"{"platforms":[
          {"id":"esp32:esp32","maintainer":"Espressif Systems","website":"https://github.com/espressif/arduino-esp32",
           "indexed":true,"releases":{"3.0.7":{"name":"esp32","version":"3.0.7","types":["Arduino"],"installed":true,
           "boards":[{"name":"ESP32 Dev Module","fqbn":"esp32:esp32:esp32"},{"name":"ESP32S3 Dev Module","fqbn":"esp32:esp32:esp32s3"}],
           "compatible":true}},"installed_version":"3.0.7","latest_version":"3.1.0"},
          {"id":"arduino:avr","releases":{"1.8.6":{"name":"Arduino AVR Boards","version":"1.8.6","compatible":true}},
           "installed_version":"1.8.6","latest_version":"1.8.6"},
          {"id":"esp8266:esp8266","releases":{},"latest_version":"3.1.2"}]}"#;
        let list = parse_core_list(json).unwrap();
        assert_eq!(list.len(), 2, "{list:?}");
        assert_eq!(list[0].id, "esp32:esp32");
        assert_eq!(list[0].version, "3.0.7");
        assert_eq!(
            list[0].boards[1],
            ("esp32:esp32:esp32s3".into(), "ESP32S3 Dev Module".into())
        );
        assert!(list[1].boards.is_empty());
        assert_eq!(parse_core_list(r#"{"platforms":[]}"#).unwrap(), vec![]);
        assert_eq!(parse_core_list("{}").unwrap(), vec![]);
        assert!(parse_core_list("ID Installed").is_err());
        assert_eq!(
            platform_of("esp8266:esp8266:nodemcuv2:eesz=4M2M"),
            "esp8266:esp8266"
        );
    }

    #[test]
    fn folders() {
        let home = Path::new("/home/op");
        assert_eq!(
            Dirs::resolve(None, None, None, None, home),
            Dirs {
                data: "/home/op/.arduino15".into(),
                downloads: "/home/op/.arduino15/staging".into(),
                user: "/home/op/Arduino".into(),
            }
        );
        let dump = r#"{"config":{"board_manager":{"additional_urls":[]},
            "directories":{"data":"/srv/arduino/data","user":"/srv/arduino/sketchbook"}}}"#;
        let dirs = Dirs::resolve(None, None, None, Some(dump), home);
        assert_eq!(dirs.data, Path::new("/srv/arduino/data"));
        assert_eq!(dirs.downloads, Path::new("/srv/arduino/data/staging"));
        assert_eq!(dirs.user, Path::new("/srv/arduino/sketchbook"));
        // What the operator set wins over the file.
        let dirs = Dirs::resolve(Some("/opt/cores".into()), None, None, Some(dump), home);
        assert_eq!(dirs.data, Path::new("/opt/cores"));
        assert_eq!(dirs.user, Path::new("/srv/arduino/sketchbook"));
    }

    #[test]
    fn environments() {
        let env = environment(
            (JAIL_DATA, JAIL_DOWNLOADS, JAIL_USER),
            Some(&Cache::Environment {
                writable: "/build/work".into(),
                read_only: Some("/build/cache".into()),
            }),
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ARDUINO_DIRECTORIES_DATA"), Some(JAIL_DATA));
        assert_eq!(get("ARDUINO_DIRECTORIES_USER"), Some(JAIL_USER));
        assert_eq!(get("ARDUINO_BUILD_CACHE_PATH"), Some("/build/work"));
        assert_eq!(get("ARDUINO_BUILD_CACHE_EXTRA_PATHS"), Some("/build/cache"));
        assert_eq!(get("ARDUINO_UPDATER_ENABLE_NOTIFICATION"), Some("false"));
        let env = environment(
            ("/d", "/s", "/u"),
            Some(&Cache::Flags {
                build: "/b".into(),
                cache: "/c".into(),
            }),
        );
        assert!(
            env.iter()
                .all(|(k, _)| !k.starts_with("ARDUINO_BUILD_CACHE"))
        );
    }

    /// Standard error as arduino-cli 1.x prints it in text mode (and a JSON-mode fatal error).
    #[test]
    fn failures() {
        let compile_error = "/build/sketch/sketch.ino: In function 'void loop()':\n\
            /build/sketch/sketch.ino:3:3: error: 'foo' was not declared in this scope\n\
            \x20   3 |   foo();\n\
            \x20     |   ^~~\n\
            Error during build: exit status 1\n";
        assert_eq!(failure_message(compile_error), None);
        let no_core = "Error during build: Platform 'esp8266:esp8266' not found: platform not installed\n\
            Try running `arduino-cli core install esp8266:esp8266`\n";
        let m = failure_message(no_core).unwrap();
        assert!(m.starts_with("Platform 'esp8266:esp8266' not found"), "{m}");
        assert!(m.ends_with("core install esp8266:esp8266`"), "{m}");
        let bad_fqbn = "Error during build: Invalid FQBN: not an FQBN: esp32:esp32\n";
        assert_eq!(
            failure_message(bad_fqbn).as_deref(),
            Some("Invalid FQBN: not an FQBN: esp32:esp32")
        );
        let no_board = "Error during build: Invalid FQBN: board esp32:esp32:nope not found\n";
        assert!(
            failure_message(no_board)
                .unwrap()
                .contains("nope not found")
        );
        let fatal_json = "{\n  \"error\": \"Error: invalid path writing inventory file: /arduino/data/inventory.yaml error\"\n}\n";
        assert!(
            failure_message(fatal_json)
                .unwrap()
                .contains("inventory file")
        );
        let inventory = "Error: invalid path creating config dir: /arduino/data error: mkdir /arduino/data: read-only file system\n";
        assert!(failure_message(inventory).unwrap().contains("read-only"));
        let coloured =
            "\x1b[31mError during build: Platform 'x:y' not found: platform not installed\x1b[0m\n";
        assert_eq!(
            failure_message(coloured).as_deref(),
            Some("Platform 'x:y' not found: platform not installed")
        );
        assert_eq!(failure_message(""), None);
        assert_eq!(strip_ansi("\x1b[1m\x1b[31ma\x1b[0mb"), "ab");
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,300}") {
            let _ = failure_message(&s);
            let _ = strip_ansi(&s);
            let _ = parse_core_list(&s);
            let _ = Version::parse_json(&s);
        }
    }
}
