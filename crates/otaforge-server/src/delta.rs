//! Making esp_delta_ota patches: bsdiff's triples (the `bsdiff` crate) written as a detools
//! sequential heatshrink patch (`otaforge_formats::delta::encode`), behind the 64-byte
//! header naming the base by its id, and checked by applying it before it is handed out.

use otaforge_formats::delta;

/// The detools sequential heatshrink patch from `base` to `target`, checked by applying it.
pub fn detools_patch(base: &[u8], target: &[u8]) -> Result<Vec<u8>, String> {
    let mut raw = Vec::new();
    bsdiff::diff(base, target, &mut raw).map_err(|e| format!("bsdiff: {e}"))?;
    let steps = delta::steps_from_bsdiff(&raw).ok_or("bsdiff's output does not read")?;
    let patch = delta::encode(target.len() as u64, &steps);
    match delta::apply(base, &patch) {
        Ok(made) if made == target => Ok(patch),
        Ok(_) => Err("the patch does not give the target back".into()),
        Err(e) => Err(format!("the patch does not apply: {e}")),
    }
}

/// An esp_delta_ota file from `base` to `target` (ESP images as shipped): the header with the
/// base's id (its appended SHA-256), then the checked detools patch.
pub fn esp_delta(base: &[u8], target: &[u8]) -> Result<Vec<u8>, String> {
    let id = delta::base_id(base).ok_or("the base is too short to be an ESP image")?;
    let mut file = delta::header(&id).to_vec();
    file.extend_from_slice(&detools_patch(base, target)?);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// The fixture images made by esptool (scripts/fixtures.sh).
    fn fixture(name: &str) -> Vec<u8> {
        let out = root().join("target/fixtures");
        let status = Command::new("bash")
            .arg(root().join("scripts/fixtures.sh"))
            .arg(&out)
            .status()
            .expect("bash");
        assert!(status.success(), "scripts/fixtures.sh failed");
        std::fs::read(out.join(name)).unwrap()
    }

    /// PyPI detools' python (scripts/test.sh installs it, `OTAFORGE_TEST_DETOOLS`).
    fn detools() -> PathBuf {
        let python = std::env::var_os("OTAFORGE_TEST_DETOOLS")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target/tools/detools-venv/bin/python"));
        assert!(
            python.exists(),
            "{} is missing: PyPI detools 0.53.0 in a venv there (scripts/test.sh installs it)",
            python.display()
        );
        python
    }

    fn run(python: &Path, args: &[&Path]) {
        let out = Command::new(python)
            .args(["-m", "detools"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "detools {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Patches both ways between this code and PyPI detools, on esptool-made images with
    /// realistic differences (scripts/fixtures.sh): a changed function, a changed constant, a
    /// grown image (and a rewrite: app-v1 to app-v2, whose new data is random): each applied
    /// by the other side gives the target byte for byte.
    #[test]
    fn patches_cross_check_with_detools() {
        let python = detools();
        let dir = std::env::temp_dir().join(format!("otaforge-delta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v1 = fixture("app-v1.bin");
        let v2 = fixture("app-v2.bin");
        let pairs = [
            (
                "changed function",
                v2.clone(),
                fixture("app-v2-func.bin"),
                true,
            ),
            (
                "changed constant",
                v2.clone(),
                fixture("app-v2-const.bin"),
                true,
            ),
            ("grown image", v2.clone(), fixture("app-v2-grown.bin"), true),
            ("rewrite", v1.clone(), v2.clone(), false),
        ];
        for (name, base, target, small) in &pairs {
            let (name, base, target) = (name.replace(' ', "-"), base, target);
            let (b, t) = (
                dir.join(format!("{name}.base")),
                dir.join(format!("{name}.target")),
            );
            std::fs::write(&b, base).unwrap();
            std::fs::write(&t, target).unwrap();
            // Ours, applied by detools.
            let started = std::time::Instant::now();
            let ours = detools_patch(base, target).unwrap();
            let took = started.elapsed();
            let ours_path = dir.join(format!("{name}.ours"));
            std::fs::write(&ours_path, &ours).unwrap();
            let out = dir.join(format!("{name}.out"));
            run(&python, &[Path::new("apply_patch"), &b, &ours_path, &out]);
            assert!(
                std::fs::read(&out).unwrap() == *target,
                "{name}: detools applied ours"
            );
            // detools', applied by ours.
            let theirs_path = dir.join(format!("{name}.theirs"));
            let out = Command::new(&python)
                .args(["-m", "detools", "create_patch", "-c", "heatshrink"])
                .args([&b, &t, &theirs_path])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let theirs = std::fs::read(&theirs_path).unwrap();
            assert_eq!(theirs[0], 0x04, "sequential heatshrink");
            let applied = delta::apply(base, &theirs).unwrap();
            assert!(applied == *target, "{name}: ours applied detools'");
            eprintln!(
                "{name}: target {} B, our patch {} B (made and checked in {took:?}), detools' {} B",
                target.len(),
                ours.len(),
                theirs.len()
            );
            if *small {
                assert!(
                    ours.len() < target.len() / 10,
                    "{name}: much smaller than the image"
                );
            }
        }
        // The esp_delta_ota header names the base by its appended SHA-256.
        let file = esp_delta(&v1, &v2).unwrap();
        assert_eq!(&file[..4], &[0x10, 0xde, 0xcd, 0xfc]);
        assert_eq!(&file[4..36], &v1[v1.len() - 32..]);
        assert_eq!(delta::apply(&v1, &file[64..]).unwrap(), v2);
        // A patch for another base does not give the target.
        let mut other = v1.clone();
        other[0x400] ^= 0x20;
        assert_ne!(delta::apply(&other, &file[64..]).ok(), Some(v2));
    }
}
