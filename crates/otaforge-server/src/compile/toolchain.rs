//! The toolchain check: run at start and by every arduino-cli build, inside the same jail as
//! the builds (`arduino-cli version --json`, `core list --json`). What it finds is shown in
//! the workspace: which boards this server can build, and what its administrator would
//! install for the others.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::arduino_cli::{self, Dirs, Platform, Version};
use super::{Cli, CompileConfig, Sandbox};

/// What the last check found.
#[derive(Debug, Clone, Default)]
pub struct ToolchainStatus {
    /// Whether a check ran at all (tests and `otaforge` subcommands that do not build skip it).
    pub checked: bool,
    /// arduino-cli's version and installed cores, when it ran.
    pub cli: Option<(Version, Vec<Platform>)>,
    pub builder: bool,
    /// Each in words for the server's administrator.
    pub problems: Vec<String>,
}

/// Whether this server can build a board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoardState {
    /// With what, such as `arduino-cli 1.1.1, esp32:esp32 3.0.7`.
    Ready(String),
    /// Why not, and what the administrator would do.
    Missing(String),
    /// Not checked yet.
    Unknown,
}

/// The message for a core arduino-cli does not have.
pub fn missing_core(platform: &str) -> String {
    let url = match platform {
        "esp32:esp32" => {
            " (first `arduino-cli config add board_manager.additional_urls \
             https://espressif.github.io/arduino-esp32/package_esp32_index.json` and \
             `arduino-cli core update-index`)"
        }
        "esp8266:esp8266" => {
            " (first `arduino-cli config add board_manager.additional_urls \
             https://arduino.esp8266.com/stable/package_esp8266com_index.json` and \
             `arduino-cli core update-index`)"
        }
        _ => "",
    };
    format!(
        "this server's arduino-cli has no {platform} core; its administrator installs it with \
         `arduino-cli core install {platform}`{url}, as the user that owns arduino-cli's folders"
    )
}

impl ToolchainStatus {
    pub fn board(&self, fqbn: &str) -> BoardState {
        if fqbn.starts_with("arduino:avr:") && self.builder {
            return BoardState::Ready("Debian's arduino-builder".into());
        }
        if !self.checked {
            return BoardState::Unknown;
        }
        let platform = arduino_cli::platform_of(fqbn);
        match &self.cli {
            Some((version, platforms)) => match platforms.iter().find(|p| p.id == platform) {
                Some(p) => BoardState::Ready(format!(
                    "arduino-cli {}, {} {}",
                    version.text, p.id, p.version
                )),
                None => BoardState::Missing(missing_core(&platform)),
            },
            None => BoardState::Missing(self.problems.first().cloned().unwrap_or_else(|| {
                "arduino-cli is not installed on this server; its administrator installs it \
                 (https://arduino.github.io/arduino-cli/) and restarts otaforge"
                    .into()
            })),
        }
    }
}

impl CompileConfig {
    /// Checks the toolchain as builds will run it and keeps the result for the workspace.
    /// `work` is a scratch folder.
    pub fn preflight(&self, work: &Path) -> ToolchainStatus {
        let mut status = ToolchainStatus {
            checked: true,
            builder: self.arduino_builder.is_some(),
            ..Default::default()
        };
        match &self.arduino_cli {
            None => status.problems.push(
                "arduino-cli is not installed on this server (nor configured with \
                 --arduino-cli): its administrator installs it \
                 (https://arduino.github.io/arduino-cli/) and restarts otaforge"
                    .into(),
            ),
            Some(program) => match self.probe_cli(program, work) {
                Ok(_) => return self.status(),
                Err(problem) => status.problems.push(problem),
            },
        }
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = status.clone();
        status
    }

    /// The last check's result.
    pub fn status(&self) -> ToolchainStatus {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// arduino-cli's folders: as configured, else as its own configuration file says (read
    /// by `arduino-cli config dump --json` on the host, with the server's environment), else
    /// its defaults.
    pub fn arduino_dirs(&self, program: &Path) -> Dirs {
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        let dump = if self.arduino_data.is_some()
            && self.arduino_downloads.is_some()
            && self.arduino_user.is_some()
        {
            None
        } else {
            run_bounded(
                Command::new(program).args(["config", "dump", "--json"]),
                Duration::from_secs(20),
            )
        };
        Dirs::resolve(
            self.arduino_data.clone(),
            self.arduino_downloads.clone(),
            self.arduino_user.clone(),
            dump.as_deref(),
            Path::new(&home),
        )
    }

    /// Runs `version --json` and `core list --json` in the build jail; updates the status.
    pub(crate) fn probe_cli(&self, program: &Path, work: &Path) -> Result<Cli, String> {
        let program = std::fs::canonicalize(program)
            .map_err(|e| format!("arduino-cli at {}: {e}", program.display()))?;
        let dirs = self.arduino_dirs(&program);
        if !dirs.data.join("inventory.yaml").is_file() {
            return Err(format!(
                "arduino-cli has not been run with its data folder {} yet (there is no \
                 inventory.yaml, and builds cannot write there): its administrator runs \
                 `arduino-cli core list` once as the user that owns that folder, or sets \
                 the folder with --arduino-data-dir",
                dirs.data.display()
            ));
        }
        let cache = work.join("cache");
        for dir in ["sketch", "out", "build", "cache"] {
            std::fs::create_dir_all(work.join(dir))
                .map_err(|e| format!("creating {}: {e}", work.display()))?;
        }
        let probe = Cli {
            program,
            dirs,
            version: Version {
                text: String::new(),
                number: None,
            },
            platforms: Vec::new(),
        };
        let sandbox =
            Sandbox::new(self, work, &cache, false, Some(&probe)).map_err(|f| f.message)?;
        let env = arduino_cli::environment(sandbox.arduino_dirs(), None);
        let run = |args: &[&str]| -> Result<String, String> {
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let out = sandbox.run(&sandbox.cli_program(), &args, &env, &mut |_| {})?;
            if out.success {
                Ok(out.stdout)
            } else {
                Err(format!(
                    "`arduino-cli {}` fails in the build sandbox: {}",
                    args.join(" "),
                    arduino_cli::failure_message(&out.stderr)
                        .or(out.failure)
                        .unwrap_or_else(|| out.text.trim().chars().take(500).collect())
                ))
            }
        };
        let outcome = run(&["version", "--json"]).and_then(|version| {
            let version = Version::parse_json(&version)?;
            let platforms = arduino_cli::parse_core_list(&run(&["core", "list", "--json"])?)?;
            Ok((version, platforms))
        });
        let _ = std::fs::remove_dir_all(work);
        let (version, platforms) = outcome?;
        *self.status.write().unwrap_or_else(|e| e.into_inner()) = ToolchainStatus {
            checked: true,
            cli: Some((version.clone(), platforms.clone())),
            builder: self.arduino_builder.is_some(),
            problems: Vec::new(),
        };
        Ok(Cli {
            version,
            platforms,
            ..probe
        })
    }
}

/// Standard output of a trusted host command, or `None` when it fails or takes too long.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Option<String> {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut out = String::new();
                use std::io::Read;
                child.stdout.take()?.read_to_string(&mut out).ok()?;
                return status.success().then_some(out);
            }
            Ok(None) if started.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}
