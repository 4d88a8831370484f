//! Password hashing on a fixed set of dedicated threads.
//!
//! Argon2id with OWASP's parameters (19 MiB, two passes, one lane) needs a
//! 19 MiB work area per hash. Run on tokio's blocking pool, every hash lands on
//! whichever of up to 512 threads is free, each thread's malloc arena keeps its
//! last work area, and a burst of logins leaves hundreds of megabytes behind.
//! Here a few named threads each allocate one work area on first use and reuse
//! it for every hash, so the memory hashing can ever hold is
//! `threads × 19 MiB`, whatever the traffic.
//!
//! Work reaches the threads through a bounded queue. When it is full the
//! caller is told at once ([`HashError::Busy`]) instead of waiting behind
//! seconds of hashing: a login that cannot start soon is better refused with
//! a `Retry-After` than left hanging.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use anyhow::{Context, anyhow};
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::oneshot;

/// Why a hash was not computed.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("too many password checks are waiting")]
    Busy,
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// A unit of work for a hashing thread, given that thread's work area.
type Job = Box<dyn FnOnce(&mut WorkArea) + Send>;

/// The queue in front of the hashing threads. Dropping it stops the threads
/// once they finish the jobs already queued.
pub struct Hasher {
    queue: SyncSender<Job>,
}

impl Hasher {
    /// Starts `threads` hashing threads behind a queue of `queue` waiting jobs.
    pub fn start(threads: usize, queue: usize) -> anyhow::Result<Self> {
        let (sender, receiver) = sync_channel::<Job>(queue);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || work(&receiver))
                .context("starting a password hashing thread")?;
        }
        Ok(Hasher { queue: sender })
    }

    /// Runs `job` on a hashing thread, or refuses at once when the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut WorkArea) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, HashError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |area| {
            // The caller may have gone (client disconnected); nothing to tell.
            let _ = reply.send(job(area));
        });
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => HashError::Busy,
            TrySendError::Disconnected(_) => HashError::Failed(anyhow!("hashing threads stopped")),
        })?;
        let result = answer
            .await
            .map_err(|_| anyhow!("a hashing thread stopped mid-job"))?;
        Ok(result?)
    }

    /// Hashes a password with argon2id, OWASP parameters and a random salt, as a
    /// PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`).
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move |area| area.hash(password.as_bytes())).await
    }

    /// Checks a password against a stored PHC string, comparing in constant time.
    pub async fn verify(&self, password: String, phc: String) -> Result<bool, HashError> {
        self.run(move |area| area.verify(password.as_bytes(), &phc))
            .await
    }
}

/// A hashing thread: take jobs until the `Hasher` is dropped.
fn work(receiver: &Mutex<Receiver<Job>>) {
    let mut area = WorkArea::default();
    loop {
        // The lock is held only while waiting for the next job, never while
        // hashing; a poisoned lock means another hashing thread panicked
        // while waiting, which leaves the receiver itself intact.
        let next = receiver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv();
        match next {
            Ok(job) => job(&mut area),
            Err(_) => break,
        }
    }
}

/// The largest work area a stored hash may ask for: four times the default.
/// Every hash this server writes uses the default; anything far above it is a
/// damaged or foreign row, not a reason to allocate gigabytes.
const MAX_BLOCKS: usize = 4 * Params::DEFAULT_M_COST as usize;

/// One thread's argon2 memory, allocated on first use and then reused.
#[derive(Default)]
struct WorkArea {
    blocks: Vec<Block>,
}

impl WorkArea {
    fn blocks(&mut self, params: &Params) -> anyhow::Result<&mut [Block]> {
        let count = params.block_count();
        anyhow::ensure!(
            count <= MAX_BLOCKS,
            "stored hash asks for {count} KiB of memory"
        );
        if self.blocks.len() < count {
            self.blocks.resize(count, Block::default());
        }
        Ok(&mut self.blocks[..count])
    }

    /// Argon2id into `out` with these parameters, in this thread's memory.
    fn compute(
        &mut self,
        argon2: &Argon2<'_>,
        params: &Params,
        password: &[u8],
        salt: &[u8],
        out: &mut [u8],
    ) -> anyhow::Result<()> {
        let blocks = self.blocks(params)?;
        argon2
            .hash_password_into_with_memory(password, salt, out, blocks)
            .map_err(|e| anyhow!("hashing a password: {e}"))
    }

    fn hash(&mut self, password: &[u8]) -> anyhow::Result<String> {
        let params = Params::default();
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let salt = SaltString::generate(&mut OsRng);
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt
            .decode_b64(&mut salt_bytes)
            .map_err(|e| anyhow!("encoding a salt: {e}"))?;
        let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
        self.compute(&argon2, &params, password, salt_bytes, &mut out)?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(|e| anyhow!("{e}"))?,
            salt: Some(salt.as_salt()),
            hash: Some(Output::new(&out).map_err(|e| anyhow!("{e}"))?),
        };
        Ok(phc.to_string())
    }

    fn verify(&mut self, password: &[u8], phc: &str) -> anyhow::Result<bool> {
        let invalid = |e: &dyn std::fmt::Display| anyhow!("stored hash is invalid: {e}");
        let stored = PasswordHash::new(phc).map_err(|e| invalid(&e))?;
        let algorithm = Algorithm::try_from(stored.algorithm).map_err(|e| invalid(&e))?;
        let version = match stored.version {
            Some(v) => Version::try_from(v).map_err(|e| invalid(&e))?,
            None => Version::default(),
        };
        let params = Params::try_from(&stored).map_err(|e| invalid(&e))?;
        let (Some(salt), Some(expected)) = (stored.salt, stored.hash) else {
            return Err(invalid(&"no salt or no hash"));
        };
        let mut salt_bytes = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(|e| invalid(&e))?;
        let mut out = vec![0u8; expected.len()];
        let argon2 = Argon2::new(algorithm, version, params.clone());
        self.compute(&argon2, &params, password, salt_bytes, &mut out)?;
        let computed = Output::new(&out).map_err(|e| invalid(&e))?;
        // `Output` compares in constant time.
        Ok(computed == expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

    #[tokio::test]
    async fn hashes_are_standard_argon2id() {
        let hasher = Hasher::start(1, 4).unwrap();
        let phc = hasher.hash("hunter2".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        // The argon2 crate's own verifier agrees, and ours reads its hashes.
        let parsed = PasswordHash::new(&phc).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"hunter2", &parsed)
                .is_ok()
        );
        let theirs = argon2::password_hash::PasswordHasher::hash_password(
            &Argon2::default(),
            b"s3cret",
            &SaltString::generate(&mut OsRng),
        )
        .unwrap()
        .to_string();
        assert!(
            hasher
                .verify("s3cret".into(), theirs.clone())
                .await
                .unwrap()
        );
        assert!(!hasher.verify("s3cre".into(), theirs).await.unwrap());
        assert!(
            hasher
                .verify("x".into(), "not a hash".into())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let hasher = Hasher::start(1, 1).unwrap();
        let jobs: Vec<_> = (0..6).map(|_| hasher.hash("pw".into())).collect();
        let results = futures_util::future::join_all(jobs).await;
        let busy = results
            .iter()
            .filter(|r| matches!(r, Err(HashError::Busy)))
            .count();
        // One running, at most one waiting, the rest refused without waiting.
        assert!(busy >= 4, "{results:?}");
        assert!(results.iter().any(Result::is_ok), "{results:?}");
    }
}
