//! The compile service: Arduino toolchains found on PATH (or configured), each build run
//! inside a bubblewrap sandbox with CPU, memory, wall-time and output caps, its output read
//! into a log and diagnostics, its binary returned. Pure of HTTP and of the database.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use otaforge_store::model::Diagnostic;

use crate::diagnostics;

pub mod arduino_cli;
mod toolchain;

use arduino_cli::{Cache, Dirs, JAIL_CLI, JAIL_DATA, JAIL_DOWNLOADS, JAIL_USER};
pub use toolchain::{BoardState, ToolchainStatus};

/// Where the tools are and how builds are confined.
#[derive(Debug, Clone)]
pub struct CompileConfig {
    /// Builds run at once inside `otaforge serve` (0: none; use `otaforge worker`).
    pub workers: usize,
    pub arduino_cli: Option<PathBuf>,
    /// arduino-cli's folders when set by the operator (else read from `arduino-cli config
    /// dump`, else its defaults under `$HOME`).
    pub arduino_data: Option<PathBuf>,
    pub arduino_downloads: Option<PathBuf>,
    pub arduino_user: Option<PathBuf>,
    pub arduino_builder: Option<PathBuf>,
    /// `bwrap`; builds refuse to run unconfined unless `allow_unsandboxed`.
    pub bwrap: Option<PathBuf>,
    pub allow_unsandboxed: bool,
    pub limits: Limits,
    /// What the last check of the toolchain found (at start, and by every arduino-cli build).
    pub status: std::sync::Arc<std::sync::RwLock<ToolchainStatus>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub cpu_seconds: u64,
    pub memory_bytes: u64,
    pub wall: Duration,
    pub output_bytes: u64,
    pub processes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_seconds: 300,
            memory_bytes: 4 << 30,
            wall: Duration::from_secs(600),
            output_bytes: 64 << 20,
            processes: 512,
        }
    }
}

impl Default for CompileConfig {
    fn default() -> Self {
        CompileConfig {
            workers: 1,
            arduino_cli: find_on_path("arduino-cli"),
            arduino_data: None,
            arduino_downloads: None,
            arduino_user: None,
            arduino_builder: find_on_path("arduino-builder"),
            bwrap: find_on_path("bwrap"),
            allow_unsandboxed: false,
            limits: Limits::default(),
            status: Default::default(),
        }
    }
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Which compiler builds an FQBN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    ArduinoCli(PathBuf),
    ArduinoBuilder(PathBuf),
}

impl CompileConfig {
    /// Any compiler at all? (The workspace explains how to install one when not.)
    pub fn has_compiler(&self) -> bool {
        self.arduino_cli.is_some() || self.arduino_builder.is_some()
    }

    pub fn backend_for(&self, fqbn: &str) -> Result<Backend, String> {
        if fqbn.starts_with("arduino:avr:")
            && let Some(builder) = &self.arduino_builder
        {
            return Ok(Backend::ArduinoBuilder(builder.clone()));
        }
        if let Some(cli) = &self.arduino_cli {
            return Ok(Backend::ArduinoCli(cli.clone()));
        }
        Err(format!(
            "no compiler for {fqbn} is installed on this server. Install arduino-cli \
             (https://arduino.github.io/arduino-cli/) and the board's core, for example \
             `arduino-cli core install esp32:esp32`, then restart otaforge; for arduino:avr \
             boards Debian's `apt-get install arduino-builder arduino-core-avr` also works"
        ))
    }
}

/// FQBNs are `vendor:arch:board[:options]` of safe characters.
pub fn check_fqbn(fqbn: &str) -> Result<(), String> {
    let parts: Vec<&str> = fqbn.split(':').collect();
    let ok = parts.len() >= 3
        && fqbn.len() <= 200
        && parts[..3].iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        })
        && fqbn
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'\'' && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{fqbn:?} is not a board name like arduino:avr:uno or esp32:esp32:esp32"
        ))
    }
}

/// Sketch file names: `name.ino`, `.h`, `.hpp`, `.c`, `.cpp`; no paths.
pub fn check_file_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && [".ino", ".h", ".hpp", ".c", ".cpp"]
            .iter()
            .any(|ext| name.ends_with(ext));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a sketch file name (letters, digits, _ - . ending in .ino, .h, .hpp, .c or .cpp)"
        ))
    }
}

/// The sketch's main file: the `.ino` named first (the others are tabs).
pub fn main_file(files: &BTreeMap<String, String>) -> Result<&str, String> {
    files
        .keys()
        .find(|k| k.ends_with(".ino"))
        .map(String::as_str)
        .ok_or_else(|| "the sketch needs a .ino file".to_string())
}

/// A finished compile.
#[derive(Debug)]
pub struct Compiled {
    pub binary: Vec<u8>,
    pub diagnostics: Vec<Diagnostic>,
    /// The other images arduino-cli exported beside the application (ESP32 cores 3.x):
    /// `merged.bin` (bootloader, partition table and application at their offsets, written
    /// from 0x0), `bootloader.bin`, `partitions.bin`, as (name, bytes).
    pub images: Vec<(String, Vec<u8>)>,
}

/// The exported files kept as [`Compiled::images`]: (file in `--output-dir`, name kept).
pub const EXPORTED_IMAGES: &[(&str, &str)] = &[
    ("sketch.ino.merged.bin", "merged.bin"),
    ("sketch.ino.bootloader.bin", "bootloader.bin"),
    ("sketch.ino.partitions.bin", "partitions.bin"),
];

#[derive(Debug)]
pub struct CompileFailure {
    pub message: String,
    pub diagnostics: Vec<Diagnostic>,
}

impl CompileFailure {
    fn plain(message: String) -> CompileFailure {
        CompileFailure {
            message,
            diagnostics: Vec::new(),
        }
    }
}

/// One build's folders: `work/sketch` (the sources, read-only to the compiler), `work/out`;
/// `cache` is shared by builds of the same board and reused.
pub struct Job<'a> {
    pub fqbn: &'a str,
    pub files: &'a BTreeMap<String, String>,
    /// Extra files the platform adds (the update library), not shown to the user.
    pub extra_files: BTreeMap<String, String>,
    /// `--build-property` values for arduino-cli.
    pub build_properties: Vec<String>,
    pub work: &'a Path,
    pub cache: &'a Path,
}

/// arduino-cli as one build runs it: the binary, its folders, its version and cores.
pub(crate) struct Cli {
    pub program: PathBuf,
    pub dirs: Dirs,
    pub version: arduino_cli::Version,
    pub platforms: Vec<arduino_cli::Platform>,
}

impl Cli {
    /// The cache for a user build (`warm`: for the warm-up, which alone writes the shared
    /// cache) in `sandbox`'s paths.
    fn cache(&self, sandbox: &Sandbox, warm: bool) -> Cache {
        if self.version.caches_by_environment() {
            Cache::Environment {
                writable: if warm {
                    sandbox.cache_path()
                } else {
                    sandbox.build_path()
                },
                read_only: (!warm).then(|| sandbox.cache_path()),
            }
        } else {
            Cache::Flags {
                build: sandbox.build_path(),
                cache: sandbox.cache_path(),
            }
        }
    }
}

/// Runs the compile, streaming output lines to `log`.
pub fn compile(
    config: &CompileConfig,
    job: &Job,
    log: &mut dyn FnMut(&str),
) -> Result<Compiled, CompileFailure> {
    let fail = CompileFailure::plain;
    check_fqbn(job.fqbn).map_err(fail)?;
    let backend = config.backend_for(job.fqbn).map_err(fail)?;
    let main = main_file(job.files).map_err(fail)?.to_string();
    // Arduino wants the main file named after its folder: sketch/sketch.ino.
    let sketch_dir = job.work.join("sketch");
    let out_dir = job.work.join("out");
    for dir in [
        &sketch_dir,
        &out_dir,
        &job.work.join("build"),
        &job.cache.to_path_buf(),
    ] {
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    }
    let mut rename: BTreeMap<String, String> = BTreeMap::new();
    for (name, content) in job.files.iter().chain(job.extra_files.iter()) {
        check_file_name(name).map_err(fail)?;
        let on_disk = if *name == main {
            "sketch.ino".to_string()
        } else {
            name.clone()
        };
        std::fs::write(sketch_dir.join(&on_disk), content)
            .map_err(|e| fail(format!("writing {on_disk}: {e}")))?;
        rename.insert(on_disk, name.clone());
    }

    // arduino-cli is checked on every build: the version decides how the cache is passed,
    // and a new arduino-cli or core version makes the warm-up run again.
    let cli = match &backend {
        Backend::ArduinoCli(program) => {
            let cli = config
                .probe_cli(program, &job.work.join("probe"))
                .map_err(fail)?;
            let platform = arduino_cli::platform_of(job.fqbn);
            if !cli.platforms.iter().any(|p| p.id == platform) {
                return Err(fail(toolchain::missing_core(&platform)));
            }
            Some(cli)
        }
        Backend::ArduinoBuilder(_) => None,
    };

    warm_cache(config, &backend, cli.as_ref(), job, log)?;
    let sandbox = Sandbox::new(config, job.work, job.cache, false, cli.as_ref())?;
    let cache = cli.as_ref().map(|c| c.cache(&sandbox, false));
    let (program, args, env) = toolchain_command(
        &backend,
        job.fqbn,
        &sandbox,
        &job.build_properties,
        cache.as_ref(),
    );
    log(&format!("$ {} {}\n", program.display(), args.join(" ")));
    let started = Instant::now();
    let output = sandbox.run(&program, &args, &env, log).map_err(fail)?;
    log(&format!(
        "\n[{} in {:.1} s]\n",
        if output.success { "compiled" } else { "failed" },
        started.elapsed().as_secs_f64()
    ));

    let sketch_prefixes = [
        format!("{}/", sandbox.sketch_path()),
        format!("{}/", sketch_dir.display()),
    ];
    // The build folder's copy of the sketch: `{build}/sketch/…` with `--build-path`,
    // `{cache}/sketches/{hash}/sketch/…` when arduino-cli places the build itself.
    let build_root = sandbox.build_path();
    let map = |path: &str| -> Option<String> {
        let name = sketch_prefixes
            .iter()
            .find_map(|p| path.strip_prefix(p.as_str()))
            .or_else(|| {
                path.strip_prefix(build_root.as_str())
                    .and_then(|rest| rest.split_once("/sketch/"))
                    .map(|(_, name)| name)
            })?;
        let name = name
            .strip_suffix(".cpp")
            .filter(|n| n.ends_with(".ino"))
            .unwrap_or(name);
        Some(
            rename
                .get(name)
                .cloned()
                .unwrap_or_else(|| name.to_string()),
        )
    };
    let diagnostics = diagnostics::parse(&arduino_cli::strip_ansi(&output.text), map);
    if !output.success {
        let outside = diagnostics.iter().any(|d| {
            d.message.starts_with('/') && d.message.ends_with("No such file or directory")
        });
        let message = output
            .failure
            .or_else(|| {
                cli.as_ref()
                    .and_then(|_| arduino_cli::failure_message(&output.stderr))
            })
            .unwrap_or_else(|| {
                if outside {
                    "the compiler reported errors: a sketch may include only its own files and the \
                     board's libraries (the build cannot read anything else on the server)"
                        .to_string()
                } else {
                    "the compiler reported errors".to_string()
                }
            });
        return Err(CompileFailure {
            message,
            diagnostics,
        });
    }
    let binary = match backend {
        Backend::ArduinoCli(_) => std::fs::read(out_dir.join("sketch.ino.bin"))
            .map_err(|e| fail(format!("the compiler made no sketch.ino.bin: {e}")))?,
        Backend::ArduinoBuilder(_) => {
            let elf = job.work.join("build").join("sketch.ino.elf");
            let bin = out_dir.join("sketch.ino.bin");
            let status = Command::new("avr-objcopy")
                .args(["-O", "binary", "-R", ".eeprom"])
                .arg(&elf)
                .arg(&bin)
                .status()
                .map_err(|e| fail(format!("running avr-objcopy: {e}")))?;
            if !status.success() {
                return Err(fail("avr-objcopy could not make the .bin".into()));
            }
            std::fs::read(&bin).map_err(|e| fail(format!("reading {}: {e}", bin.display())))?
        }
    };
    if binary.is_empty() {
        return Err(fail("the compiler made an empty binary".into()));
    }
    let images = EXPORTED_IMAGES
        .iter()
        .filter_map(|(file, name)| {
            let bytes = std::fs::read(out_dir.join(file)).ok()?;
            (!bytes.is_empty()).then(|| (name.to_string(), bytes))
        })
        .collect();
    Ok(Compiled {
        binary,
        diagnostics,
        images,
    })
}

/// The compiler command and environment for a job in `sandbox` (its paths are the jail's, or
/// the host's when builds run unsandboxed): one definition for user builds and the warm-up.
fn toolchain_command(
    backend: &Backend,
    fqbn: &str,
    sandbox: &Sandbox,
    build_properties: &[String],
    cache: Option<&Cache>,
) -> (PathBuf, Vec<String>, Vec<(String, String)>) {
    match backend {
        Backend::ArduinoBuilder(builder) => (
            builder.clone(),
            vec![
                "-compile".into(),
                "-hardware".into(),
                "/usr/share/arduino/hardware".into(),
                "-hardware".into(),
                "/usr/share/arduino-builder".into(),
                "-tools".into(),
                "/usr/share/arduino-builder".into(),
                "-fqbn".into(),
                fqbn.into(),
                "-prefs".into(),
                "build.extra_flags=-DDECIMAL_DIG=17".into(),
                // A flood of errors would make the builder buffer them until it runs out of memory.
                "-prefs".into(),
                "compiler.cpp.extra_flags=-fmax-errors=20".into(),
                "-prefs".into(),
                "compiler.c.extra_flags=-fmax-errors=20".into(),
                "-build-cache".into(),
                sandbox.cache_path(),
                "-build-path".into(),
                sandbox.build_path(),
                format!("{}/sketch.ino", sandbox.sketch_path()),
            ],
            Vec::new(),
        ),
        Backend::ArduinoCli(_) => {
            // Text output streams while the compiler runs (JSON output is held back until
            // arduino-cli exits); `--warnings default` shows warnings at their lines.
            let mut args: Vec<String> = vec![
                "compile".into(),
                "--fqbn".into(),
                fqbn.into(),
                "--warnings".into(),
                "default".into(),
                "--output-dir".into(),
                sandbox.out_path(),
            ];
            if let Some(Cache::Flags { build, cache }) = cache {
                args.extend([
                    "--build-path".into(),
                    build.clone(),
                    "--build-cache-path".into(),
                    cache.clone(),
                ]);
            }
            for property in build_properties {
                args.push("--build-property".into());
                args.push(property.clone());
            }
            args.push(sandbox.sketch_path());
            let env = arduino_cli::environment(sandbox.arduino_dirs(), cache);
            (sandbox.cli_program(), args, env)
        }
    }
}

/// Builds an empty sketch once per board with the cache writable, so that user builds can
/// reuse the compiled core from a cache they can only read (no build can poison it for the
/// next one). The cache remembers the toolchain it was made by and is made again when
/// arduino-cli or the board's core changes version.
fn warm_cache(
    config: &CompileConfig,
    backend: &Backend,
    cli: Option<&Cli>,
    job: &Job,
    log: &mut dyn FnMut(&str),
) -> Result<(), CompileFailure> {
    let fail = CompileFailure::plain;
    let key = match cli {
        Some(cli) => {
            let platform = arduino_cli::platform_of(job.fqbn);
            let version = cli
                .platforms
                .iter()
                .find(|p| p.id == platform)
                .map(|p| p.version.as_str())
                .unwrap_or("?");
            format!("arduino-cli {}; {platform} {version}\n", cli.version.text)
        }
        None => "arduino-builder\n".to_string(),
    };
    let marker = job.cache.join(".warm");
    match std::fs::read_to_string(&marker) {
        Ok(made_by) if made_by == key => return Ok(()),
        Ok(made_by) => {
            log(&format!(
                "the core cache was made by {}; making it again for {}",
                made_by.trim(),
                key
            ));
            std::fs::remove_dir_all(job.cache)
                .and_then(|()| std::fs::create_dir_all(job.cache))
                .map_err(|e| fail(format!("clearing the core cache: {e}")))?;
        }
        Err(_) => {}
    }
    let work = job.work.join("warm");
    for dir in ["sketch", "out", "build"] {
        std::fs::create_dir_all(work.join(dir))
            .map_err(|e| fail(format!("creating the warm-up folder: {e}")))?;
    }
    std::fs::write(
        work.join("sketch/sketch.ino"),
        "void setup() {}\nvoid loop() {}\n",
    )
    .map_err(|e| fail(format!("writing the warm-up sketch: {e}")))?;
    let sandbox = Sandbox::new(config, &work, job.cache, true, cli)?;
    // The same command as a user build, on the sandbox's own paths (jailed or not).
    let cache = cli.map(|c| c.cache(&sandbox, true));
    let (program, args, env) = toolchain_command(backend, job.fqbn, &sandbox, &[], cache.as_ref());
    log(&format!(
        "preparing the {} core cache (first build for this board)\n",
        job.fqbn
    ));
    let out = sandbox
        .run(&program, &args, &env, &mut |_| {})
        .map_err(fail)?;
    let _ = std::fs::remove_dir_all(&work);
    // arduino-cli >= 1.1 built the warm-up sketch itself inside the cache: only the core stays.
    let _ = std::fs::remove_dir_all(job.cache.join("sketches"));
    if !out.success {
        log(&out.text);
        let reason = cli
            .and_then(|_| arduino_cli::failure_message(&out.stderr))
            .map(|m| format!(": {m}"))
            .unwrap_or_else(|| "; is the board's core installed?".into());
        return Err(fail(format!(
            "the {} toolchain cannot build an empty sketch{reason}",
            job.fqbn
        )));
    }
    std::fs::write(&marker, key).map_err(|e| fail(format!("marking the cache: {e}")))?;
    Ok(())
}

struct RunOutput {
    success: bool,
    /// stdout and stderr interleaved as they came.
    text: String,
    stdout: String,
    stderr: String,
    failure: Option<String>,
}

/// A bubblewrap jail: the toolchain's folders read-only, the sketch read-only, the build
/// folders writable, nothing else of the host; no network; resource caps by `prlimit`.
struct Sandbox {
    bwrap: Option<PathBuf>,
    limits: Limits,
    sketch: PathBuf,
    out: PathBuf,
    build: PathBuf,
    cache: PathBuf,
    /// Only the trusted warm-up build may write the shared cache.
    cache_writable: bool,
    /// arduino-cli and its folders, bound at fixed places in the jail.
    cli: Option<(PathBuf, Dirs)>,
    /// A `python3` installed outside `/usr` (its prefix, bound at the same path): ESP32
    /// recipes run `python3` from PATH.
    python_prefix: Option<PathBuf>,
}

const JAIL_SKETCH: &str = "/build/sketch";
const JAIL_OUT: &str = "/build/out";
const JAIL_BUILD: &str = "/build/work";
const JAIL_CACHE: &str = "/build/cache";

/// The prefix of the `python3` on PATH when the jail's `/usr` has none (pyenv, conda, /opt).
fn python_prefix() -> Option<PathBuf> {
    if Path::new("/usr/bin/python3").exists() {
        return None;
    }
    let python = std::fs::canonicalize(find_on_path("python3")?).ok()?;
    if python.starts_with("/usr") {
        return None;
    }
    Some(python.parent()?.parent()?.to_path_buf())
}

impl Sandbox {
    /// A jail over `work`'s `sketch`, `out` and `build` folders and the shared `cache`.
    fn new(
        config: &CompileConfig,
        work: &Path,
        cache: &Path,
        cache_writable: bool,
        cli: Option<&Cli>,
    ) -> Result<Sandbox, CompileFailure> {
        if config.bwrap.is_none() && !config.allow_unsandboxed {
            return Err(CompileFailure::plain(
                "builds run inside bubblewrap, which is not installed: apt-get install bubblewrap"
                    .into(),
            ));
        }
        Ok(Sandbox {
            bwrap: config.bwrap.clone(),
            limits: config.limits,
            sketch: work.join("sketch"),
            out: work.join("out"),
            build: work.join("build"),
            cache: cache.to_path_buf(),
            cache_writable,
            cli: cli.map(|c| (c.program.clone(), c.dirs.clone())),
            python_prefix: python_prefix(),
        })
    }

    fn jailed(&self) -> bool {
        self.bwrap.is_some()
    }

    /// `inside` in the jail, `host` without one.
    fn path(&self, inside: &str, host: &Path) -> String {
        if self.jailed() {
            inside.into()
        } else {
            host.display().to_string()
        }
    }

    fn sketch_path(&self) -> String {
        self.path(JAIL_SKETCH, &self.sketch)
    }

    fn out_path(&self) -> String {
        self.path(JAIL_OUT, &self.out)
    }

    fn cache_path(&self) -> String {
        self.path(JAIL_CACHE, &self.cache)
    }

    fn build_path(&self) -> String {
        self.path(JAIL_BUILD, &self.build)
    }

    fn cli_program(&self) -> PathBuf {
        match &self.cli {
            Some(_) if self.jailed() => PathBuf::from(JAIL_CLI),
            Some((program, _)) => program.clone(),
            None => PathBuf::from("arduino-cli"),
        }
    }

    /// arduino-cli's data, downloads and user folders as the compiler sees them.
    fn arduino_dirs(&self) -> (&str, &str, &str) {
        match &self.cli {
            Some((_, dirs)) if !self.jailed() => (
                dirs.data.to_str().unwrap_or(JAIL_DATA),
                dirs.downloads.to_str().unwrap_or(JAIL_DOWNLOADS),
                dirs.user.to_str().unwrap_or(JAIL_USER),
            ),
            _ => (JAIL_DATA, JAIL_DOWNLOADS, JAIL_USER),
        }
    }

    fn command(&self, program: &Path, args: &[String], env: &[(String, String)]) -> Command {
        let l = self.limits;
        let caps = [
            format!("--cpu={}:{}", l.cpu_seconds, l.cpu_seconds + 5),
            format!("--as={}", l.memory_bytes),
            format!("--fsize={}", l.output_bytes),
            format!("--nproc={}", l.processes),
        ];
        let Some(bwrap) = &self.bwrap else {
            let mut cmd = Command::new("prlimit");
            cmd.args(caps).arg("--").arg(program).args(args);
            cmd.envs(env.iter().map(|(k, v)| (k, v)));
            return cmd;
        };
        let mut cmd = Command::new(bwrap);
        cmd.args([
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ]);
        cmd.args(["--ro-bind", "/usr", "/usr"]);
        for (link, target) in [
            ("/bin", "usr/bin"),
            ("/sbin", "usr/sbin"),
            ("/lib", "usr/lib"),
            ("/lib64", "usr/lib64"),
        ] {
            if Path::new(link).is_symlink() {
                cmd.args(["--symlink", target, link]);
            } else if Path::new(link).exists() {
                cmd.args(["--ro-bind", link, link]);
            }
        }
        if Path::new("/etc/alternatives").exists() {
            cmd.args(["--ro-bind", "/etc/alternatives", "/etc/alternatives"]);
        }
        let mut path = "/usr/bin:/bin".to_string();
        if let Some(prefix) = &self.python_prefix {
            cmd.arg("--ro-bind").arg(prefix).arg(prefix);
            path = format!("{}:{path}", prefix.join("bin").display());
        }
        if let Some((program, dirs)) = &self.cli {
            // Wherever arduino-cli and its folders are on the host, the jail has them at
            // fixed places, read-only.
            cmd.arg("--ro-bind").arg(program).arg(JAIL_CLI);
            for (host, inside) in [
                (&dirs.data, JAIL_DATA),
                (&dirs.downloads, JAIL_DOWNLOADS),
                (&dirs.user, JAIL_USER),
            ] {
                if host.is_dir() {
                    cmd.arg("--ro-bind").arg(host).arg(inside);
                }
            }
        }
        cmd.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
        cmd.arg("--ro-bind").arg(&self.sketch).arg(JAIL_SKETCH);
        cmd.arg("--bind").arg(&self.out).arg(JAIL_OUT);
        cmd.arg("--bind").arg(&self.build).arg(JAIL_BUILD);
        cmd.arg(if self.cache_writable {
            "--bind"
        } else {
            "--ro-bind"
        })
        .arg(&self.cache)
        .arg(JAIL_CACHE);
        cmd.args(["--remount-ro", "/"]);
        cmd.args([
            "--setenv",
            "HOME",
            "/build/home",
            "--setenv",
            "TMPDIR",
            "/tmp",
        ]);
        cmd.arg("--setenv").arg("PATH").arg(path);
        for (key, value) in env {
            cmd.arg("--setenv").arg(key).arg(value);
        }
        cmd.args(["--chdir", "/build/out", "--", "prlimit"]);
        cmd.args(caps).arg("--").arg(program).args(args);
        cmd
    }

    fn run(
        &self,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &mut dyn FnMut(&str),
    ) -> Result<RunOutput, String> {
        let mut child = self
            .command(program, args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the compiler: {e}"))?;
        let (tx, rx) = std::sync::mpsc::channel::<(bool, String)>();
        let mut readers = Vec::new();
        for (is_out, stream) in [
            (
                true,
                child
                    .stdout
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
            ),
            (
                false,
                child
                    .stderr
                    .take()
                    .map(|s| Box::new(s) as Box<dyn Read + Send>),
            ),
        ] {
            let Some(mut stream) = stream else { continue };
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0
                        || tx
                            .send((is_out, String::from_utf8_lossy(&buf[..n]).into_owned()))
                            .is_err()
                    {
                        break;
                    }
                }
            }));
        }
        drop(tx);
        let deadline = Instant::now() + self.limits.wall;
        let (mut text, mut stdout, mut stderr) = (String::new(), String::new(), String::new());
        let mut failure = None;
        const MAX_LOG: usize = 1 << 20;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok((is_out, chunk)) => {
                    if text.len() < MAX_LOG {
                        text.push_str(&chunk);
                        log(&chunk);
                    }
                    let own = if is_out { &mut stdout } else { &mut stderr };
                    if own.len() < 8 * MAX_LOG {
                        own.push_str(&chunk);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                failure = Some(format!(
                    "the build took longer than {} s and was stopped",
                    self.limits.wall.as_secs()
                ));
                break;
            }
        }
        let status = child
            .wait()
            .map_err(|e| format!("waiting for the compiler: {e}"))?;
        for reader in readers {
            let _ = reader.join();
        }
        #[cfg(unix)]
        if failure.is_none() {
            use std::os::unix::process::ExitStatusExt;
            // A cap hits the process over it (the compiler, or a tool it runs): by signal,
            // by a shell's 128+signal exit code, or only in the output of the tool above it.
            let signal = status.signal().or_else(|| {
                status
                    .code()
                    .filter(|c| (129..160).contains(c))
                    .map(|c| c - 128)
            });
            let cpu = signal == Some(24) || text.contains("CPU time limit exceeded");
            let fsize = signal == Some(25) || text.contains("File size limit exceeded");
            failure = if cpu {
                Some(format!(
                    "the build used more than {} s of CPU and was stopped",
                    self.limits.cpu_seconds
                ))
            } else if fsize {
                Some(format!(
                    "the build wrote a file larger than {} bytes and was stopped",
                    self.limits.output_bytes
                ))
            } else {
                match signal {
                    Some(9) => Some("the build was killed (memory or time limit)".into()),
                    Some(sig) => Some(format!("the compiler died with signal {sig}")),
                    None => None,
                }
            };
        }
        Ok(RunOutput {
            success: status.success() && failure.is_none(),
            text,
            stdout,
            stderr,
            failure,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a shell command inside the build jail, as the compiler would run.
    fn jailed(script: &str, limits: Limits) -> RunOutput {
        let config = CompileConfig {
            limits,
            ..CompileConfig::default()
        };
        assert!(
            config.bwrap.is_some(),
            "bubblewrap (bwrap) must be installed for the sandbox tests"
        );
        let base = std::env::temp_dir().join(format!(
            "otaforge-jail-{}-{}",
            std::process::id(),
            script.len()
        ));
        for d in [
            base.join("work/sketch"),
            base.join("work/out"),
            base.join("work/build"),
            base.join("cache"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        let sandbox = Sandbox::new(
            &config,
            &base.join("work"),
            &base.join("cache"),
            false,
            None,
        )
        .map_err(|f| f.message)
        .unwrap();
        let out = sandbox
            .run(
                Path::new("/bin/bash"),
                &["-c".to_string(), script.to_string()],
                &[],
                &mut |_| {},
            )
            .unwrap();
        let _ = std::fs::remove_dir_all(&base);
        out
    }

    #[test]
    fn the_jail_has_no_network_no_host_files_and_caps() {
        let out = jailed(
            "echo hi > /dev/tcp/127.0.0.1/5432 && echo connected",
            Limits::default(),
        );
        assert!(
            !out.success && !out.text.contains("connected"),
            "{}",
            out.text
        );
        let out = jailed("cat /etc/passwd", Limits::default());
        assert!(!out.success, "{}", out.text);
        let out = jailed(
            "ls /root /work /home 2>&1; touch /usr/x /build/cache/x 2>&1; echo ok > /build/out/x && cat /build/out/x",
            Limits::default(),
        );
        assert!(
            out.text.contains("No such file") && out.text.contains("Read-only"),
            "{}",
            out.text
        );
        assert!(
            out.text.trim_end().ends_with("ok"),
            "the build folder is writable: {}",
            out.text
        );
        let out = jailed(
            "head -c 3000000 /dev/zero > /build/out/big",
            Limits {
                output_bytes: 1 << 20,
                ..Limits::default()
            },
        );
        assert!(
            !out.success && out.failure.as_deref().unwrap_or("").contains("larger than"),
            "{:?}",
            out.failure
        );
        let out = jailed(
            "while :; do :; done",
            Limits {
                cpu_seconds: 1,
                ..Limits::default()
            },
        );
        assert!(
            out.failure.as_deref().unwrap_or("").contains("CPU"),
            "{:?}",
            out.failure
        );
        let out = jailed(
            "sleep 30",
            Limits {
                wall: Duration::from_secs(1),
                ..Limits::default()
            },
        );
        assert!(
            out.failure.as_deref().unwrap_or("").contains("longer than"),
            "{:?}",
            out.failure
        );
    }

    /// Without bubblewrap (allowed by configuration) the warm-up and the build run on the
    /// host's own folders: a real AVR compile by Debian's arduino-builder succeeds.
    #[test]
    fn unsandboxed_builds_warm_the_cache_and_compile() {
        let config = CompileConfig {
            bwrap: None,
            allow_unsandboxed: true,
            arduino_cli: None,
            ..CompileConfig::default()
        };
        assert!(
            config.arduino_builder.is_some(),
            "arduino-builder must be installed for this test (apt-get install arduino-builder)"
        );
        let base = std::env::temp_dir().join(format!("otaforge-unjailed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let files = BTreeMap::from([(
            "blink.ino".to_string(),
            "void setup() { pinMode(13, OUTPUT); }\nvoid loop() { digitalWrite(13, HIGH); }\n"
                .to_string(),
        )]);
        let job = Job {
            fqbn: "arduino:avr:uno",
            files: &files,
            extra_files: BTreeMap::new(),
            build_properties: Vec::new(),
            work: &base.join("work"),
            cache: &base.join("cache"),
        };
        let mut log = String::new();
        let built = compile(&config, &job, &mut |s| log.push_str(s));
        let compiled = built.unwrap_or_else(|f| panic!("{}\n{log}", f.message));
        assert!(!compiled.binary.is_empty());
        assert!(
            base.join("cache/.warm").exists(),
            "the cache was warmed: {log}"
        );
        assert!(
            !log.contains("/build/"),
            "no jail paths outside the jail: {log}"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    /// A stand-in for arduino-cli, installed outside `/usr` with its data folder elsewhere
    /// (as `install.sh` and cores of another user leave them). It answers `version`, `core
    /// list` and `config dump` in arduino-cli 1.x's JSON shapes, prints `compile` output and
    /// errors in its text shapes, and records the arguments and `ARDUINO_*` environment it
    /// was run with. It shows the jail layout, the arguments and the environment; it is not
    /// a compiler (the closing note of the build path says what needs the real one).
    struct StandIn {
        base: PathBuf,
        data: PathBuf,
    }

    impl StandIn {
        fn new(name: &str) -> StandIn {
            let base = std::env::temp_dir()
                .join(format!("otaforge-standin-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&base);
            let data = base.join("cores-of-alice/.arduino15");
            std::fs::create_dir_all(base.join("bin")).unwrap();
            std::fs::create_dir_all(&data).unwrap();
            std::fs::create_dir_all(base.join("cores-of-alice/Arduino/libraries")).unwrap();
            std::fs::write(data.join("inventory.yaml"), "installation:\n  id: x\n").unwrap();
            let script = include_str!("../../tests/stand-in/arduino-cli")
                .replace("@DATA@", data.to_str().unwrap())
                .replace(
                    "@USER@",
                    base.join("cores-of-alice/Arduino").to_str().unwrap(),
                );
            let cli = base.join("bin/arduino-cli");
            std::fs::write(&cli, script).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::create_dir_all(data.join("packages/test")).unwrap();
            let s = StandIn { base, data };
            s.set_version("1.1.1");
            s
        }

        fn set_version(&self, v: &str) {
            std::fs::write(self.data.join("version"), v).unwrap();
        }

        fn config(&self, jailed: bool) -> CompileConfig {
            let mut config = CompileConfig {
                arduino_cli: Some(self.base.join("bin/arduino-cli")),
                arduino_builder: None,
                allow_unsandboxed: !jailed,
                ..CompileConfig::default()
            };
            if jailed {
                assert!(
                    config.bwrap.is_some(),
                    "bubblewrap (bwrap) must be installed for the sandbox tests"
                );
            } else {
                config.bwrap = None;
            }
            config
        }

        fn build(
            &self,
            config: &CompileConfig,
            fqbn: &str,
            sketch: &str,
        ) -> (Result<Compiled, CompileFailure>, String, String) {
            let files = BTreeMap::from([("blink.ino".to_string(), sketch.to_string())]);
            let work = self.base.join("work");
            let _ = std::fs::remove_dir_all(&work);
            let job = Job {
                fqbn,
                files: &files,
                extra_files: BTreeMap::new(),
                build_properties: vec!["compiler.c.elf.extra_flags=-Wl,--wrap=setup".into()],
                work: &work,
                cache: &self.base.join("cache"),
            };
            let mut log = String::new();
            let result = compile(config, &job, &mut |s| log.push_str(s));
            let run = std::fs::read_to_string(work.join("out/run.txt")).unwrap_or_default();
            (result, log, run)
        }
    }

    impl Drop for StandIn {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    fn arduino_cli_builds(jailed: bool) {
        let s = StandIn::new(if jailed { "jailed" } else { "host" });
        let config = s.config(jailed);
        let (data, user) = if jailed {
            (JAIL_DATA.to_string(), JAIL_USER.to_string())
        } else {
            (
                s.data.display().to_string(),
                s.base.join("cores-of-alice/Arduino").display().to_string(),
            )
        };
        let (cache, build) = if jailed {
            (JAIL_CACHE.to_string(), JAIL_BUILD.to_string())
        } else {
            (
                s.base.join("cache").display().to_string(),
                s.base.join("work/build").display().to_string(),
            )
        };

        // The check at start finds the version and cores, in the jail the builds use.
        let status = config.preflight(&s.base.join("preflight"));
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        match status.board("test:plat:board") {
            BoardState::Ready(with) => assert!(
                with.contains("1.1.1") && with.contains("test:plat 1.0.0"),
                "{with}"
            ),
            other => panic!("{other:?}"),
        }
        match status.board("esp8266:esp8266:nodemcuv2") {
            BoardState::Missing(why) => assert!(
                why.contains("arduino-cli core install esp8266:esp8266"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }

        // arduino-cli >= 1.1: the cache by environment, no --build-path.
        let (built, log, run) = s.build(
            &config,
            "test:plat:board",
            "void setup(){}\nvoid loop(){}\n",
        );
        let compiled = built.unwrap_or_else(|f| panic!("{}\n{log}", f.message));
        assert_eq!(compiled.binary, b"APP", "no update client in this sketch");
        let images: Vec<(&str, &[u8])> = compiled
            .images
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        assert_eq!(
            images,
            vec![
                ("merged.bin", &b"MERGED"[..]),
                ("bootloader.bin", b"BOOT"),
                ("partitions.bin", b"PART")
            ]
        );
        assert!(run.contains("--warnings default"), "{run}");
        assert!(
            !run.contains("--build-path") && !run.contains("--format"),
            "{run}"
        );
        assert!(
            run.contains(&format!("ARDUINO_DIRECTORIES_DATA={data}\n")),
            "{run}"
        );
        assert!(
            run.contains(&format!("ARDUINO_DIRECTORIES_USER={user}\n")),
            "{run}"
        );
        assert!(
            run.contains(&format!("ARDUINO_BUILD_CACHE_PATH={build}\n")),
            "{run}"
        );
        assert!(
            run.contains(&format!("ARDUINO_BUILD_CACHE_EXTRA_PATHS={cache}\n")),
            "{run}"
        );
        assert!(
            run.contains("ARDUINO_UPDATER_ENABLE_NOTIFICATION=false"),
            "{run}"
        );
        assert!(
            run.lines().any(|l| l == "test"),
            "the data folder is readable: {run}"
        );
        assert!(
            log.contains("Using precompiled core"),
            "the warmed core is reused: {log}"
        );
        assert!(
            !s.base.join("cache/sketches").exists(),
            "the warm-up's sketch build is not kept"
        );
        let marker = std::fs::read_to_string(s.base.join("cache/.warm")).unwrap();
        assert_eq!(marker, "arduino-cli 1.1.1; test:plat 1.0.0\n");

        // Warnings show at their lines in a build that succeeds.
        let (built, log, _) = s.build(&config, "test:plat:board", "WARN\n");
        let compiled = built.unwrap_or_else(|f| panic!("{}\n{log}", f.message));
        let w = &compiled.diagnostics[..];
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            (w[0].file.as_str(), w[0].line, w[0].severity.as_str()),
            ("blink.ino", 1, "warning")
        );

        // The build's own diagnostics, once, under the user's file name; colour codes gone.
        let (built, log, _) = s.build(&config, "test:plat:board", "FAIL_COMPILE\n");
        let failure = built.expect_err(&log);
        assert_eq!(failure.message, "the compiler reported errors");
        assert_eq!(failure.diagnostics.len(), 1, "{:?}", failure.diagnostics);
        let d = &failure.diagnostics[0];
        assert_eq!(
            (d.file.as_str(), d.line, d.column, d.severity.as_str()),
            ("blink.ino", 2, 3, "error")
        );
        assert_eq!(d.message, "'foo' was not declared in this scope");

        // arduino-cli's own reason reaches the user.
        let (built, log, _) = s.build(&config, "test:plat:board", "FAIL_FATAL\n");
        let failure = built.expect_err(&log);
        assert!(
            failure
                .message
                .starts_with("Platform 'test:plat' not found: platform not installed")
                && failure.message.contains("core install test:plat"),
            "{}",
            failure.message
        );

        // A core arduino-cli does not have is named before anything runs.
        let (built, log, _) = s.build(&config, "esp8266:esp8266:nodemcuv2", "void setup(){}\n");
        let failure = built.expect_err(&log);
        assert!(
            failure.message.contains("no esp8266:esp8266 core"),
            "{}",
            failure.message
        );

        // The log is live: a line printed before a pause arrives before the compiler ends.
        let files = BTreeMap::from([("blink.ino".to_string(), "SLOW\n".to_string())]);
        let work = s.base.join("work");
        let _ = std::fs::remove_dir_all(&work);
        let job = Job {
            fqbn: "test:plat:board",
            files: &files,
            extra_files: BTreeMap::new(),
            build_properties: Vec::new(),
            work: &work,
            cache: &s.base.join("cache"),
        };
        let mut seen: Vec<(Instant, String)> = Vec::new();
        compile(&config, &job, &mut |c| {
            seen.push((Instant::now(), c.to_string()))
        })
        .unwrap_or_else(|f| panic!("{}", f.message));
        let first = seen
            .iter()
            .find(|(_, c)| c.contains("Compiling sketch"))
            .unwrap()
            .0;
        let last = seen
            .iter()
            .find(|(_, c)| c.contains("Sketch uses"))
            .unwrap()
            .0;
        assert!(
            last.duration_since(first) >= Duration::from_millis(800),
            "output arrives as it is printed"
        );

        // A new arduino-cli version makes the warm-up run again; before 1.1 the flags are used.
        s.set_version("1.0.4");
        let (built, log, run) = s.build(&config, "test:plat:board", "void setup(){}\n");
        built.unwrap_or_else(|f| panic!("{}\n{log}", f.message));
        assert!(log.contains("making it again"), "{log}");
        assert!(
            run.contains(&format!("--build-path {build} --build-cache-path {cache}")),
            "{run}"
        );
        assert!(!run.contains("ARDUINO_BUILD_CACHE_PATH"), "{run}");
        assert_eq!(
            std::fs::read_to_string(s.base.join("cache/.warm")).unwrap(),
            "arduino-cli 1.0.4; test:plat 1.0.0\n"
        );

        // A data folder arduino-cli never ran in is reported in words for the administrator.
        std::fs::remove_file(s.data.join("inventory.yaml")).unwrap();
        let status = config.preflight(&s.base.join("preflight"));
        match status.board("test:plat:board") {
            BoardState::Missing(why) => assert!(why.contains("inventory.yaml"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn arduino_cli_runs_from_anywhere_in_the_jail() {
        arduino_cli_builds(true);
    }

    #[test]
    fn arduino_cli_runs_unsandboxed() {
        arduino_cli_builds(false);
    }

    #[test]
    fn names() {
        assert!(check_fqbn("arduino:avr:uno").is_ok());
        assert!(check_fqbn("esp32:esp32:esp32:PartitionScheme=min_spiffs").is_ok());
        assert!(check_fqbn("arduino:avr").is_err());
        assert!(check_fqbn("a:b:c;rm -rf /").is_err());
        assert!(check_fqbn("a:b:c'x").is_err());
        assert!(check_file_name("blink.ino").is_ok());
        assert!(check_file_name("util.h").is_ok());
        assert!(check_file_name("../x.ino").is_err());
        assert!(check_file_name("x.sh").is_err());
        assert!(check_file_name(".hidden.h").is_err());
    }
}
