//! The simulator's shared state: configuration, its offset clock, randomness, and the one
//! mutex-protected [`State`] (registered clients, issued tokens, seen `jti`s, rate-limit
//! buckets, the idempotency store, accepted events, counters).
//!
//! Invariants: the state mutex is only taken in synchronous sections (never across an
//! `.await`), so a check-then-store such as "key unseen, so accept and remember" is atomic.
//! All protocol time (assertion `iat`/`exp`, token expiry, the idempotency window, `Date`,
//! `X-RateLimit-Reset`) comes from [`SimClock`]; only the token-bucket refill uses the
//! monotonic clock, so changing the offset never refills or drains a bucket.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::broadcast;

use super::{Faults, Received, SimConfig, Stats, Upload};

/// System time shifted by a settable offset (seconds).
#[derive(Debug, Default)]
pub(crate) struct SimClock {
    offset: AtomicI64,
}

impl SimClock {
    pub fn set_offset(&self, secs: i64) {
        self.offset.store(secs, Ordering::SeqCst);
    }

    /// Simulator time; clamped to the Unix epoch.
    pub fn now(&self) -> SystemTime {
        let off = self.offset.load(Ordering::SeqCst);
        let sys = SystemTime::now();
        let shifted = if off >= 0 {
            sys.checked_add(Duration::from_secs(off.unsigned_abs()))
        } else {
            sys.checked_sub(Duration::from_secs(off.unsigned_abs()))
        };
        shifted.unwrap_or(UNIX_EPOCH).max(UNIX_EPOCH)
    }

    /// Simulator time in whole Unix seconds.
    pub fn unix(&self) -> i64 {
        let secs = self
            .now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        i64::try_from(secs).unwrap_or(i64::MAX)
    }
}

/// An access token handed out by the token endpoint.
#[derive(Clone, Debug)]
pub(crate) struct IssuedToken {
    pub client: String,
    /// Simulator-clock Unix seconds.
    pub expires_at: i64,
    pub kid: String,
    /// Set by `expire_tokens`.
    pub revoked: bool,
}

/// Token bucket of one app.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    pub tokens: f64,
    pub last: Instant,
}

/// `(app, endpoint, Idempotency-Key)`.
pub(crate) type IdemKey = (String, &'static str, String);

/// A stored response for an idempotency key.
#[derive(Clone, Debug)]
pub(crate) struct IdemEntry {
    /// SHA-256 of the canonical JSON of the request body.
    pub body_hash: [u8; 32],
    pub status: u16,
    pub response: Vec<u8>,
    /// Simulator-clock Unix seconds when stored.
    pub stored_at: i64,
    /// Index into `State::received`.
    pub received_idx: usize,
}

#[derive(Default)]
pub(crate) struct State {
    /// client_id -> registered public keys (at most 2).
    pub clients: HashMap<String, Vec<jsonwebtoken::jwk::Jwk>>,
    /// access token -> what it was issued for.
    pub tokens: HashMap<String, IssuedToken>,
    /// (client_id, jti) -> the assertion's `exp`; pruned once past it (plus leeway).
    pub jtis: HashMap<(String, String), i64>,
    pub buckets: HashMap<String, Bucket>,
    pub idem: HashMap<IdemKey, IdemEntry>,
    pub received: Vec<Received>,
    pub uploads: Vec<Upload>,
    /// Event ids handed out (the upload endpoint accepts only these).
    pub event_ids: HashSet<String>,
    pub stats: Stats,
    pub tokens_by_kid: HashMap<String, u64>,
    /// Simulator-clock second of the last sweep of expired entries.
    pub last_prune: i64,
}

pub(crate) struct Shared {
    pub cfg: SimConfig,
    pub base_url: String,
    pub tenant_audience: String,
    pub clock: SimClock,
    pub rng: SystemRandom,
    pub faults: Mutex<Faults>,
    state: Mutex<State>,
    pub received_tx: broadcast::Sender<Received>,
}

impl Shared {
    pub fn new(cfg: SimConfig, base_url: String) -> Shared {
        let (received_tx, _) = broadcast::channel(1024);
        Shared {
            cfg,
            tenant_audience: format!("{base_url}/"),
            base_url,
            clock: SimClock::default(),
            rng: SystemRandom::new(),
            faults: Mutex::new(Faults::default()),
            state: Mutex::new(State::default()),
            received_tx,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn faults(&self) -> Faults {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&self) -> f64 {
        let mut b = [0u8; 4];
        // SystemRandom only fails if the OS RNG is unavailable; fall back to "no fault".
        if self.rng.fill(&mut b).is_err() {
            return 1.0 - f64::EPSILON;
        }
        f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
    }

    /// True with probability `p` (`p >= 1` always, `p <= 0` never).
    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.uniform() < p
    }

    /// `len` random characters from `[a-z0-9]`.
    pub fn random_id(&self, len: usize) -> String {
        const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut b = vec![0u8; len];
        self.rng.fill(&mut b).expect("OS random number generator");
        b.iter()
            .map(|x| char::from(ALPHABET[usize::from(*x) % ALPHABET.len()]))
            .collect()
    }

    /// `n` random bytes.
    pub fn random_bytes(&self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.rng.fill(&mut b).expect("OS random number generator");
        b
    }

    pub fn request_id(&self) -> String {
        format!("req_{}", self.random_id(12))
    }
}
