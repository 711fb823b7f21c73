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

/// Where the tools are and how builds are confined.
#[derive(Debug, Clone)]
pub struct CompileConfig {
    /// Builds run at once inside `otaforge serve` (0: none; use `otaforge worker`).
    pub workers: usize,
    pub arduino_cli: Option<PathBuf>,
    pub arduino_builder: Option<PathBuf>,
    /// `bwrap`; builds refuse to run unconfined unless `allow_unsandboxed`.
    pub bwrap: Option<PathBuf>,
    pub allow_unsandboxed: bool,
    pub limits: Limits,
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
            arduino_builder: find_on_path("arduino-builder"),
            bwrap: find_on_path("bwrap"),
            allow_unsandboxed: false,
            limits: Limits::default(),
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
}

#[derive(Debug)]
pub struct CompileFailure {
    pub message: String,
    pub diagnostics: Vec<Diagnostic>,
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

/// Runs the compile, streaming output lines to `log`.
pub fn compile(
    config: &CompileConfig,
    job: &Job,
    log: &mut dyn FnMut(&str),
) -> Result<Compiled, CompileFailure> {
    let fail = |message: String| CompileFailure {
        message,
        diagnostics: Vec::new(),
    };
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

    warm_cache(config, &backend, job, log)?;
    let sandbox = Sandbox::new(config, job, false)?;
    let (program, args) =
        toolchain_command(&backend, job.fqbn, &sandbox, &job.build_properties, true);
    log(&format!("$ {} {}\n", program.display(), args.join(" ")));
    let started = Instant::now();
    let output = sandbox.run(&program, &args, log).map_err(fail)?;
    log(&format!(
        "\n[{} in {:.1} s]\n",
        if output.success { "compiled" } else { "failed" },
        started.elapsed().as_secs_f64()
    ));

    let sketch_prefix = format!("{}/", sandbox.sketch_path());
    let build_prefix = format!("{}/sketch/", sandbox.build_path());
    let map = |path: &str| -> Option<String> {
        let name = path
            .strip_prefix(&sketch_prefix)
            .or_else(|| path.strip_prefix(&build_prefix))
            .or_else(|| path.strip_prefix(&format!("{}/", sketch_dir.display())))?;
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
    let mut text = output.text.clone();
    if let Backend::ArduinoCli(_) = backend
        && let Ok(json) = serde_json::from_str::<serde_json::Value>(output.stdout.trim())
    {
        for key in ["compiler_out", "compiler_err"] {
            if let Some(s) = json[key].as_str() {
                log(s);
                text.push_str(s);
            }
        }
    }
    let diagnostics = diagnostics::parse(&text, map);
    if !output.success {
        let outside = diagnostics.iter().any(|d| {
            d.message.starts_with('/') && d.message.ends_with("No such file or directory")
        });
        let message = output.failure.unwrap_or_else(|| {
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
    Ok(Compiled {
        binary,
        diagnostics,
    })
}

/// The compiler command for a job in `sandbox` (its paths are the jail's, or the host's when
/// builds run unsandboxed): one definition for user builds and the cache warm-up.
fn toolchain_command(
    backend: &Backend,
    fqbn: &str,
    sandbox: &Sandbox,
    build_properties: &[String],
    json: bool,
) -> (PathBuf, Vec<String>) {
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
        ),
        Backend::ArduinoCli(cli) => {
            let mut args: Vec<String> = vec![
                "compile".into(),
                "--fqbn".into(),
                fqbn.into(),
                "--output-dir".into(),
                sandbox.out_path(),
                "--build-path".into(),
                sandbox.build_path(),
                "--build-cache-path".into(),
                sandbox.cache_path(),
            ];
            if json {
                args.extend(["--format".into(), "json".into()]);
            }
            for property in build_properties {
                args.push("--build-property".into());
                args.push(property.clone());
            }
            args.push(sandbox.sketch_path());
            (cli.clone(), args)
        }
    }
}

/// Builds an empty sketch once per board with the cache writable, so that user builds can
/// reuse the compiled core from a cache they can only read (no build can poison it for the
/// next one).
fn warm_cache(
    config: &CompileConfig,
    backend: &Backend,
    job: &Job,
    log: &mut dyn FnMut(&str),
) -> Result<(), CompileFailure> {
    let marker = job.cache.join(".warm");
    if marker.exists() {
        return Ok(());
    }
    let fail = |message: String| CompileFailure {
        message,
        diagnostics: Vec::new(),
    };
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
    let warm_job = Job {
        fqbn: job.fqbn,
        files: job.files,
        extra_files: BTreeMap::new(),
        build_properties: Vec::new(),
        work: &work,
        cache: job.cache,
    };
    let sandbox = Sandbox::new(config, &warm_job, true)?;
    // The same command as a user build, on the sandbox's own paths (jailed or not).
    let (program, args) = toolchain_command(backend, job.fqbn, &sandbox, &[], false);
    log(&format!(
        "preparing the {} core cache (first build for this board)\n",
        job.fqbn
    ));
    let out = sandbox.run(&program, &args, &mut |_| {}).map_err(fail)?;
    let _ = std::fs::remove_dir_all(&work);
    if !out.success {
        log(&out.text);
        return Err(fail(format!(
            "the {} toolchain cannot build an empty sketch; is the board's core installed?",
            job.fqbn
        )));
    }
    std::fs::write(&marker, b"").map_err(|e| fail(format!("marking the cache: {e}")))?;
    Ok(())
}

struct RunOutput {
    success: bool,
    /// stdout and stderr interleaved as they came.
    text: String,
    stdout: String,
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
}

const JAIL_SKETCH: &str = "/build/sketch";
const JAIL_OUT: &str = "/build/out";
const JAIL_BUILD: &str = "/build/work";
const JAIL_CACHE: &str = "/build/cache";

impl Sandbox {
    fn new(
        config: &CompileConfig,
        job: &Job,
        cache_writable: bool,
    ) -> Result<Sandbox, CompileFailure> {
        if config.bwrap.is_none() && !config.allow_unsandboxed {
            return Err(CompileFailure {
                message: "builds run inside bubblewrap, which is not installed: apt-get install bubblewrap".into(),
                diagnostics: Vec::new(),
            });
        }
        Ok(Sandbox {
            bwrap: config.bwrap.clone(),
            limits: config.limits,
            sketch: job.work.join("sketch"),
            out: job.work.join("out"),
            build: job.work.join("build"),
            cache: job.cache.to_path_buf(),
            cache_writable,
        })
    }

    fn jailed(&self) -> bool {
        self.bwrap.is_some()
    }

    fn sketch_path(&self) -> String {
        if self.jailed() {
            JAIL_SKETCH.into()
        } else {
            self.sketch.display().to_string()
        }
    }

    fn out_path(&self) -> String {
        if self.jailed() {
            JAIL_OUT.into()
        } else {
            self.out.display().to_string()
        }
    }

    fn cache_path(&self) -> String {
        if self.jailed() {
            JAIL_CACHE.into()
        } else {
            self.cache.display().to_string()
        }
    }

    fn build_path(&self) -> String {
        if self.jailed() {
            JAIL_BUILD.into()
        } else {
            self.build.display().to_string()
        }
    }

    fn command(&self, program: &Path, args: &[String]) -> Command {
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
        if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
            // arduino-cli keeps its cores under ~/.arduino15.
            let data = home.join(".arduino15");
            if data.exists() {
                cmd.arg("--ro-bind")
                    .arg(&data)
                    .arg("/build/home/.arduino15");
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
            "PATH",
            "/usr/bin:/bin",
            "--setenv",
            "TMPDIR",
            "/tmp",
        ]);
        cmd.args(["--chdir", "/build/out", "--", "prlimit"]);
        cmd.args(caps).arg("--").arg(program).args(args);
        cmd
    }

    fn run(
        &self,
        program: &Path,
        args: &[String],
        log: &mut dyn FnMut(&str),
    ) -> Result<RunOutput, String> {
        let mut child = self
            .command(program, args)
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
        let (mut text, mut stdout) = (String::new(), String::new());
        let mut failure = None;
        const MAX_LOG: usize = 1 << 20;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok((is_out, chunk)) => {
                    if text.len() < MAX_LOG {
                        text.push_str(&chunk);
                        log(&chunk);
                    }
                    if is_out && stdout.len() < 8 * MAX_LOG {
                        stdout.push_str(&chunk);
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
        let files = BTreeMap::new();
        let job = Job {
            fqbn: "x:y:z",
            files: &files,
            extra_files: BTreeMap::new(),
            build_properties: Vec::new(),
            work: &base.join("work"),
            cache: &base.join("cache"),
        };
        for d in [
            base.join("work/sketch"),
            base.join("work/out"),
            base.join("work/build"),
            base.join("cache"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        let sandbox = Sandbox::new(&config, &job, false)
            .map_err(|f| f.message)
            .unwrap();
        let out = sandbox
            .run(
                Path::new("/bin/bash"),
                &["-c".to_string(), script.to_string()],
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
