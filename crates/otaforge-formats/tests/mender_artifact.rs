//! Artifacts made by Debian's real `mender-artifact write module-image` (signed with an RSA
//! key), read by `mender::inspect_mender`: what it reports, and the faults it names when the
//! artifact is damaged. Needs `mender-artifact` and `openssl` (scripts/test.sh installs them).

use std::process::Command;

use otaforge_formats::mender::{MenderError, inspect_mender};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?} could not start ({e}): apt-get install mender-artifact openssl")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn artifacts_made_by_mender_artifact() {
    let dir = std::env::temp_dir().join(format!("otaforge-mender-artifact-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let payload: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 241) as u8).collect();
    std::fs::write(dir.join("app.bin"), &payload).unwrap();
    std::fs::write(dir.join("dest_dir"), "/tmp/out").unwrap();
    std::fs::write(dir.join("filename"), "payload.bin").unwrap();
    std::fs::write(dir.join("permissions"), "0644").unwrap();
    run(Command::new("openssl").current_dir(&dir).args([
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "rsa.pem",
    ]));
    // mender-artifact 3.9 reads only the traditional RSA key form.
    run(Command::new("openssl").current_dir(&dir).args([
        "rsa",
        "-in",
        "rsa.pem",
        "-traditional",
        "-out",
        "k.rsa",
    ]));
    let write = |out: &str, signed: bool| {
        let mut cmd = Command::new("mender-artifact");
        cmd.current_dir(&dir)
            .args([
                "write",
                "module-image",
                "-T",
                "single-file",
                "-t",
                "otaforge-ci",
            ])
            .args(["-t", "otaforge-ci-2", "-n", "app-1.0.1", "-o", out])
            .args([
                "-f",
                "dest_dir",
                "-f",
                "filename",
                "-f",
                "permissions",
                "-f",
                "app.bin",
            ]);
        if signed {
            cmd.args(["-k", "k.rsa"]);
        }
        run(&mut cmd);
        std::fs::read(dir.join(out)).unwrap()
    };

    let signed = write("signed.mender", true);
    let info = inspect_mender(&signed).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.artifact_name, "app-1.0.1");
    assert_eq!(info.device_types, ["otaforge-ci", "otaforge-ci-2"]);
    assert_eq!(info.payload_types, ["single-file"]);
    assert!(info.signed);
    assert!(
        info.files
            .contains(&("data/0000/app.bin".to_string(), payload.len() as u64)),
        "{:?}",
        info.files
    );
    let plain = write("plain.mender", false);
    assert!(!inspect_mender(&plain).unwrap().signed);

    // A damaged byte of the payload (inside data/0000.tar.gz) fails its gzip check or its
    // manifest sha256; a damaged manifest line is named.
    let mut damaged = signed.clone();
    let data_at = damaged
        .windows(16)
        .position(|w| w.starts_with(b"data/0000.tar.gz"))
        .unwrap();
    let at = data_at + 512 + 200;
    damaged[at] ^= 0xff;
    let e = inspect_mender(&damaged).unwrap_err();
    assert!(
        matches!(e, MenderError::Compression(_) | MenderError::Checksum(_)),
        "{e}"
    );
    let mut damaged = signed.clone();
    let sum_at = damaged.windows(8).position(|w| w == b"  data/0").unwrap() - 64;
    damaged[sum_at] = if damaged[sum_at] == b'a' { b'b' } else { b'a' };
    let e = inspect_mender(&damaged).unwrap_err();
    assert!(
        matches!(e, MenderError::Checksum(ref p) if p.starts_with("data/0000/")),
        "{e}"
    );
    assert!(e.to_string().contains("does not have the sha256"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
