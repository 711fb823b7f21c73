//! `.swu` images made by Debian's real `swugenerator` (signed with CMS by openssl), read by
//! `swu::inspect_swu`: what it reports, and the faults it names when the archive is damaged. Needs `swugenerator` and `openssl` (scripts/test.sh installs them).

use std::path::Path;
use std::process::Command;

use otaforge_formats::swu::{SwuError, inspect_swu};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?} could not start ({e}): apt-get install swugenerator openssl")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// As a user writes it for swugenerator, which fills in the sha256.
const DESCRIPTION: &str = r#"software =
{
	version = "4.5.6";
	hardware-compatibility: [ "1.0", "2.0" ];
	images: (
		{
			filename = "app.bin";
			type = "rawfile";
			path = "/tmp/target/payload.bin";
			sha256 = "$swupdate_get_sha256(app.bin)";
			properties: { create-destination = "true"; };
		}
	);
}
"#;

fn generate(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::write(dir.join(format!("{name}.in")), DESCRIPTION).unwrap();
    run(Command::new("swugenerator")
        .current_dir(dir)
        .args([
            "-s",
            &format!("{name}.in"),
            "-a",
            ".",
            "-o",
            &format!("{name}.swu"),
        ])
        .args(["-k", "CMS,k.pem,c.pem", "create"]));
    std::fs::read(dir.join(format!("{name}.swu"))).unwrap()
}

#[test]
fn images_made_by_swugenerator() {
    let dir = std::env::temp_dir().join(format!("otaforge-swugen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("app.bin"), &payload).unwrap();
    run(Command::new("openssl")
        .current_dir(&dir)
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem",
        ])
        .args(["-out", "c.pem", "-subj", "/CN=otaforge-ci", "-days", "30"]));

    let swu = generate(&dir, "good");
    let info = inspect_swu(&swu).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info.version, "4.5.6");
    assert_eq!(info.hardware, ["1.0", "2.0"]);
    assert!(info.signed, "swugenerator -k CMS adds sw-description.sig");
    assert_eq!(info.images.len(), 1);
    let image = &info.images[0];
    assert_eq!(
        (image.filename.as_str(), image.kind.as_str()),
        ("app.bin", "rawfile")
    );
    assert_eq!(image.size, payload.len() as u64);
    use sha2::Digest;
    assert_eq!(image.sha256, hex(&sha2::Sha256::digest(&payload)));

    // swugenerator always writes the real sha256, so damage its archive: a flipped payload
    // byte fails the 070702 data sum; the same archive as plain 070701 (no sums) fails the
    // sha256 that sw-description gives.
    let mut damaged = swu.clone();
    let at = damaged
        .windows(16)
        .position(|w| w == &payload[1000..1016])
        .expect("the payload is stored as it is");
    damaged[at] ^= 0xff;
    assert!(
        matches!(inspect_swu(&damaged), Err(SwuError::BadChecksum(ref n)) if n == "app.bin"),
        "{:?}",
        inspect_swu(&damaged)
    );
    let mut at = 0;
    while let Some(p) = damaged[at..].windows(6).position(|w| w == b"070702") {
        damaged[at + p + 5] = b'1';
        at += p + 6;
    }
    match inspect_swu(&damaged) {
        Err(e @ SwuError::ImageHash { .. }) => assert!(e.to_string().contains("app.bin"), "{e}"),
        other => panic!("a payload that does not match its sha256 must be named: {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
