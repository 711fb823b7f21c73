//! Sealing of secrets the platform must read back (a device's Wi-Fi credentials, kept for
//! its setup firmware): ChaCha20-Poly1305 under a key kept in the data folder
//! (`secret.key`, created 0600 on first start) or given as `OTAFORGE_SECRET_KEY` (hex).

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

use crate::auth::hex;

/// The platform's sealing key.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    /// For HMACs (device tokens, signed download links), derived from the same key.
    mac_key: [u8; 32],
}

impl Sealer {
    /// Loads the key from `OTAFORGE_SECRET_KEY`, or `data_dir/secret.key`, creating it once.
    pub fn load(data_dir: &Path) -> anyhow::Result<Sealer> {
        use anyhow::Context;
        let key = match std::env::var("OTAFORGE_SECRET_KEY") {
            Ok(hexkey) => unhex(hexkey.trim())
                .filter(|k| k.len() == 32)
                .context("OTAFORGE_SECRET_KEY must be 64 hex characters")?,
            Err(_) => {
                let path = data_dir.join("secret.key");
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        unhex(text.trim())
                            .filter(|k| k.len() == 32)
                            .with_context(|| {
                                format!("{} is not a 64-hex-character key", path.display())
                            })?
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let mut key = [0u8; 32];
                        getrandom::fill(&mut key)
                            .map_err(|e| anyhow::anyhow!("random key: {e}"))?;
                        write_private(&path, &hex(&key))
                            .with_context(|| format!("writing {}", path.display()))?;
                        key.to_vec()
                    }
                    Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
                }
            }
        };
        use sha2::Digest;
        let mut derive = sha2::Sha256::new();
        derive.update(b"otaforge hmac key\0");
        derive.update(&key);
        Ok(Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
            mac_key: derive.finalize().into(),
        })
    }

    /// HMAC-SHA256 of `data` under the server's key.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.mac_key)
            .expect("HMAC takes a key of any length");
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the HMAC of `data` (in constant time).
    pub fn verify_mac(&self, data: &[u8], tag: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        tag.len() == 32 && bool::from(self.mac(data).ct_eq(tag))
    }

    /// `hex(nonce || ciphertext)`.
    pub fn seal(&self, plain: &[u8]) -> anyhow::Result<String> {
        Ok(hex(&self.seal_bytes(plain)?))
    }

    /// `nonce || ciphertext`.
    pub fn seal_bytes(&self, plain: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random nonce: {e}"))?;
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain)
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The plain bytes, or `None` if the text was not sealed with this key.
    pub fn open(&self, sealed: &str) -> Option<Vec<u8>> {
        self.open_bytes(&unhex(sealed)?)
    }

    /// [`Sealer::open`] of `nonce || ciphertext`.
    pub fn open_bytes(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        if bytes.len() < 12 + 16 {
            return None;
        }
        let (nonce, body) = bytes.split_at(12);
        self.cipher.decrypt(Nonce::from_slice(nonce), body).ok()
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let dir = std::env::temp_dir().join(format!("otaforge-seal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("secret.key"));
        let sealer = Sealer::load(&dir).unwrap();
        let sealed = sealer.seal(b"ssid\0password").unwrap();
        assert!(!sealed.contains("ssid"));
        assert_eq!(sealer.open(&sealed).unwrap(), b"ssid\0password");
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(sealer.open(std::str::from_utf8(&tampered).unwrap()), None);
        // The same key is read back on the next start.
        let again = Sealer::load(&dir).unwrap();
        assert_eq!(again.open(&sealed).unwrap(), b"ssid\0password");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
