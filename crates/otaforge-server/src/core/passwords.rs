//! Every password check of the server: the web sign-in (operators and bots), the REST
//! login and the static link's Basic credentials go through `PasswordGuard::check`, so one
//! rate limit, one bound on concurrent argon2 runs and one timing rule hold for all of them.
//!
//! - A password that already verified against the same stored hash is accepted from memory
//!   (a fleet polling its static links costs one argon2 run per device, and keeps working
//!   while someone floods the server with wrong passwords).
//! - Otherwise the attempt takes a slot in the limiter first (keyed by the source address and
//!   the normalised name, and by the address alone), so a burst of concurrent wrong guesses is
//!   counted before any of them is hashed.
//! - Hashing runs on at most `permits` blocking threads at a time (argon2id uses 19 MiB each);
//!   an attempt that cannot get one within a second is refused as busy, so memory stays bounded.
//! - An unknown name is hashed against a dummy hash: it costs what a wrong password costs, so
//!   the response time does not tell which names exist.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use otaforge_store::Store;

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::auth::{hash_password, verify_password_in};

/// Why a password check was not even tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many failures for this name from this address (or from this address at all).
    RateLimited,
    /// Every hashing slot is taken: try again shortly.
    Busy,
}

impl Refused {
    pub fn message(self) -> &'static str {
        match self {
            Refused::RateLimited => "too many failed sign-ins; wait five minutes and try again",
            Refused::Busy => "the server is busy checking passwords; try again in a few seconds",
        }
    }
}

/// Names compared as people mean them: case and white space do not make a new name.
pub fn normalise_name(name: &str) -> String {
    name.chars()
        .filter(|c| !c.is_whitespace() && !c.is_control())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Attempts per key in a five-minute window that starts at the first attempt, counted in
/// the database so that every node sharing it keeps the same count. An attempt is counted
/// when it starts (so concurrent guesses count), and forgotten for the name when it
/// succeeds. The address is counted first, so one address makes at most `PER_ADDRESS` rows
/// per window whatever names it tries; the gates' node prunes spent windows.
struct Limiter {
    store: Arc<dyn Store>,
}

impl Limiter {
    const WINDOW_MS: i64 = 300_000;
    /// Failures allowed per name and address.
    const PER_NAME: i64 = 5;
    /// Failures allowed per address over every name.
    const PER_ADDRESS: i64 = 50;

    fn keys(name: &str, peer: IpAddr) -> (String, String) {
        (
            format!("sign-in:{peer}|{}", normalise_name(name)),
            format!("sign-in:{peer}"),
        )
    }

    /// Takes a slot for one attempt, or refuses it. A database that cannot count refuses
    /// too (as busy): no guess goes uncounted.
    async fn begin(&self, name: &str, peer: IpAddr) -> Result<(), Refused> {
        let (by_name, by_address) = Self::keys(name, peer);
        let store = &*self.store;
        let busy = |e: otaforge_store::StoreError| {
            tracing::warn!(error = %e, "counting a sign-in attempt failed");
            Refused::Busy
        };
        if !store
            .take_slot(&by_address, Self::WINDOW_MS, Self::PER_ADDRESS)
            .await
            .map_err(busy)?
        {
            return Err(Refused::RateLimited);
        }
        if !store
            .take_slot(&by_name, Self::WINDOW_MS, Self::PER_NAME)
            .await
            .map_err(busy)?
        {
            let _ = store.give_back_slot(&by_address, false).await;
            return Err(Refused::RateLimited);
        }
        Ok(())
    }

    /// The attempt was right: it does not count against the name or the address.
    async fn succeeded(&self, name: &str, peer: IpAddr) {
        let (by_name, by_address) = Self::keys(name, peer);
        let _ = self.store.give_back_slot(&by_name, true).await;
        let _ = self.store.give_back_slot(&by_address, false).await;
    }

    /// The attempt never ran (no hashing slot): give its slot back.
    async fn abandoned(&self, name: &str, peer: IpAddr) {
        let (by_name, by_address) = Self::keys(name, peer);
        for key in [by_name, by_address] {
            let _ = self.store.give_back_slot(&key, false).await;
        }
    }
}

type Job = (String, String, tokio::sync::oneshot::Sender<bool>);

/// A fixed set of threads that run argon2 verifications, each in one work area it keeps
/// (19 MiB for the default parameters): memory is threads x work area, whatever the load.
struct Hashers {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

impl Hashers {
    fn start(threads: usize) -> Hashers {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    // One work area per thread, reused by every check.
                    let mut memory = Vec::new();
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok((password, phc, reply)) = job else {
                            return;
                        };
                        let _ = reply.send(verify_password_in(&mut memory, &password, &phc));
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        Hashers {
            jobs: Mutex::new(tx),
        }
    }

    async fn verify(&self, password: String, phc: String) -> bool {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((password, phc, reply));
        sent.is_ok() && answer.await.unwrap_or(false)
    }
}

/// The one gate in front of argon2.
pub struct PasswordGuard {
    limiter: Limiter,
    hashing: Semaphore,
    hashers: OnceLock<Hashers>,
    permits: usize,
    /// argon2 runs so far (the timing rule is that an unknown name costs one too).
    runs: std::sync::atomic::AtomicU64,
    /// Digests of (stored hash, password) pairs that verified.
    verified: Mutex<HashMap<[u8; 32], ()>>,
    dummy: OnceLock<String>,
}

impl PasswordGuard {
    const MAX_REMEMBERED: usize = 100_000;
    const WAIT_FOR_SLOT: Duration = Duration::from_secs(1);

    /// A guard counting attempts in `store`, with two hashing slots per core (2 to 8).
    pub fn new(store: Arc<dyn Store>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self::with_permits(store, (cores * 2).clamp(2, 8))
    }

    pub fn with_permits(store: Arc<dyn Store>, permits: usize) -> Self {
        PasswordGuard {
            limiter: Limiter { store },
            hashing: Semaphore::new(permits),
            hashers: OnceLock::new(),
            permits,
            runs: Default::default(),
            verified: Mutex::new(HashMap::new()),
            dummy: OnceLock::new(),
        }
    }

    fn remembered_key(password: &str, phc: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(phc.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Checks `password` for the account `name` (a user name or a device serial) whose stored
    /// argon2 hash is `stored` (`None`: no such account, or one without a password).
    /// `Ok(true)` only when the password matches.
    pub async fn check(
        &self,
        name: &str,
        peer: IpAddr,
        password: &str,
        stored: Option<&str>,
    ) -> Result<bool, Refused> {
        if let Some(phc) = stored {
            let key = Self::remembered_key(password, phc);
            if self
                .verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&key)
            {
                return Ok(true);
            }
        }
        self.limiter.begin(name, peer).await?;
        let permit = match tokio::time::timeout(Self::WAIT_FOR_SLOT, self.hashing.acquire()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                self.limiter.abandoned(name, peer).await;
                return Err(Refused::Busy);
            }
        };
        let phc = match stored {
            Some(phc) => phc.to_string(),
            None => self.dummy_hash().await,
        };
        let hashers = self.hashers.get_or_init(|| Hashers::start(self.permits));
        self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ok = hashers.verify(password.to_string(), phc.clone()).await && stored.is_some();
        drop(permit);
        if ok {
            self.limiter.succeeded(name, peer).await;
            let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if verified.len() >= Self::MAX_REMEMBERED {
                verified.clear();
            }
            verified.insert(Self::remembered_key(password, &phc), ());
        }
        Ok(ok)
    }

    /// How many argon2 checks ran.
    pub fn runs(&self) -> u64 {
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A hash of a random password with the same parameters as real ones, made once.
    async fn dummy_hash(&self) -> String {
        if let Some(h) = self.dummy.get() {
            return h.clone();
        }
        let made = tokio::task::spawn_blocking(|| {
            let mut random = [0u8; 16];
            let _ = getrandom::fill(&mut random);
            hash_password(&hex::encode(random)).unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        self.dummy.get_or_init(|| made).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder for a test's SQLite database, removed when dropped.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new() -> Self {
            let mut tag = [0u8; 8];
            getrandom::fill(&mut tag).unwrap();
            let dir = std::env::temp_dir().join(format!("otaforge-pw-{}", crate::auth::hex(&tag)));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        async fn store(&self) -> Arc<dyn Store> {
            let url = format!("sqlite://{}", self.0.join("db.sqlite").display());
            otaforge_store::open(&url).await.unwrap()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The count is the database's: a second guard on the same database (another node)
    /// refuses what the first one counted.
    #[tokio::test]
    async fn limits_are_shared_by_every_node_on_the_database() {
        let dir = TempDir::new();
        let store = dir.store().await;
        let (one, two) = (
            PasswordGuard::with_permits(store.clone(), 1),
            PasswordGuard::with_permits(store, 1),
        );
        let peer: IpAddr = "127.0.0.12".parse().unwrap();
        let phc = hash_password("right").unwrap();
        for guard in [&one, &two, &one, &two, &one] {
            assert_eq!(
                guard.check("bot", peer, "wrong", Some(&phc)).await,
                Ok(false)
            );
        }
        assert_eq!(
            two.check("bot", peer, "right", Some(&phc)).await,
            Err(Refused::RateLimited)
        );
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(normalise_name(" Admin "), "admin");
        assert_eq!(normalise_name("ad min\t"), "admin");
        assert_eq!(normalise_name("ADMIN"), normalise_name("admin"));
    }

    #[tokio::test]
    async fn limits_count_attempts_not_kinds_or_spacing() {
        let dir = TempDir::new();
        let guard = PasswordGuard::with_permits(dir.store().await, 2);
        let peer: IpAddr = "127.0.0.9".parse().unwrap();
        let phc = hash_password("right").unwrap();
        for name in ["bot", " bot", "BOT", "b o t", "bot "] {
            assert_eq!(
                guard.check(name, peer, "wrong", Some(&phc)).await,
                Ok(false)
            );
        }
        assert_eq!(
            guard.check("bot", peer, "right", Some(&phc)).await,
            Err(Refused::RateLimited)
        );
        // Another address is not affected.
        let other: IpAddr = "127.0.0.10".parse().unwrap();
        assert_eq!(
            guard.check("bot", other, "right", Some(&phc)).await,
            Ok(true)
        );
        // Once verified, the right password is accepted from memory even when limited.
        assert_eq!(
            guard.check("bot", peer, "right", Some(&phc)).await,
            Ok(true)
        );
    }

    #[tokio::test]
    async fn unknown_names_never_match_and_cost_a_hash_like_wrong_passwords() {
        let dir = TempDir::new();
        let guard = PasswordGuard::with_permits(dir.store().await, 1);
        let peer: IpAddr = "127.0.0.11".parse().unwrap();
        assert_eq!(guard.check("nobody", peer, "", None).await, Ok(false));
        assert_eq!(
            guard.runs(),
            1,
            "an unknown name is hashed like a known one"
        );
        assert_eq!(guard.check("nobody", peer, "x", None).await, Ok(false));
        assert_eq!(guard.runs(), 2);
        let phc = hash_password("right").unwrap();
        assert_eq!(
            guard.check("known", peer, "wrong", Some(&phc)).await,
            Ok(false)
        );
        assert_eq!(guard.runs(), 3);
        assert_eq!(
            guard.check("known", peer, "right", Some(&phc)).await,
            Ok(true)
        );
        assert_eq!(
            guard.check("known", peer, "right", Some(&phc)).await,
            Ok(true)
        );
        assert_eq!(guard.runs(), 4, "a remembered password costs no hash");
    }
}
