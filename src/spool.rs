//! The spool: the agent's only durable state besides its keys. It owns sled; no other
//! module touches the store.
//!
//! # On-disk layout (one sled tree; keys are byte strings)
//! - `q` ‖ class (u8) ‖ seq (u64 BE) → queued event: `VERSION` ‖ postcard([`Event`]).
//!   Iteration order is class, then seq: delivery order (alarm first, FIFO within a class).
//! - `d` ‖ seq (u64 BE) → dead letter: `VERSION` ‖ postcard([`DeadLetter`]).
//! - `t` ‖ seq (u64 BE) → tag: messages (`m` ‖ 16-byte digest) and event identities
//!   (`e` ‖ id) recently spooled, oldest first, so a broker's redelivery (MQTT DUP) or a
//!   device's republish of something already durable is recognised and not spooled twice.
//!   The newest [`RECENT_MAX`] are kept; they are also held in memory (a set loaded at
//!   open), so checking one costs no store read and adding one is an append at the end
//!   of the key space, not a random write.
//! - `m` ‖ name → counters (u64 BE): `seq` (next sequence number), `drop` ‖ class.
//!
//! # Invariants
//! - [`Spool::commit`] returns only after the batch is behind a real `fdatasync` of sled's
//!   log file (sled's own `flush` ends in `sync_file_range`, which is not enough). Callers
//!   acknowledge to the broker only after it returns `Ok`. One fsync covers a whole batch.
//! - A queued event is removed only by [`Spool::ack`] (CHeKT answered 2xx), by
//!   [`Spool::dead_letter`] (CHeKT rejected it permanently) or by eviction when the byte
//!   budget is exceeded: eviction takes the oldest event of the lowest class stored, so an
//!   alarm is never dropped while anything of a lower class is stored. Every eviction is
//!   counted persistently and reported to the caller.
//! - The budget is on live encoded bytes (what is stored, not a record count); sled's files
//!   hold more than that (see BENCHMARKS.md) and never shrink.
//! - A store that fails to open or to read back is moved aside (`spool.corrupt-<time>`)
//!   and a fresh one started; the caller is told so it can report it. Never a crash loop:
//!   sled 0.34 panics on some damage (a snapshot naming segments a truncated log lacks)
//!   instead of returning an error, and a panic inside open counts as damage
//!   ([`SpoolError::Panicked`]; release builds unwind for this). Not when it failed for lack of space (that is not corruption: it stays in place and
//!   open fails) or because another process holds its lock (`spool status` while the
//!   agent runs).
//! - A store that fails while running is closed and reopened from what is on disk. sled
//!   0.34 poisons a `Db` after a failed write (e.g. ENOSPC): every later write and flush
//!   fails, even once space is back, and memory may hold writes that never reached disk.
//!   While closed: [`Spool::commit`] fails (so nothing is acknowledged and the broker keeps
//!   the messages), [`Spool::peek`] finds nothing, [`Spool::ack`] and
//!   [`Spool::dead_letter`] leave the event queued (it is sent again, under the same
//!   `Idempotency-Key`). Reopening is tried by whichever call comes next: at once, then
//!   with backoff (250 ms doubling to 10 s; the backoff carries over when the store fails
//!   again within a minute). A batch committed again after a failure (same keys, same
//!   events) is counted once.
//! - Memory: sled's cache is set small (`spool.cache_bytes`); nothing here loads the
//!   backlog into memory (open counts it by iterating keys and value lengths).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::SpoolConfig;
use crate::event::{Class, Event};

/// Record format version, first byte of every value.
const VERSION: u8 = 1;
/// How many recent message digests and identities are kept for redelivery detection:
/// far more than can be in flight between the broker and the spool at a crash.
pub const RECENT_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool store {path}: {source}")]
    Store { path: String, source: sled::Error },
    #[error("spool store {path}: fsync failed: {source}")]
    Sync {
        path: String,
        source: std::io::Error,
    },
    #[error("spool store {path}: cannot set aside the unreadable store: {source}")]
    SetAside {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot encode record: {0}")]
    Encode(String),
    #[error("spool store {path}: unavailable after a store failure; reopening")]
    Unavailable { path: String },
    /// sled 0.34 panics on some damage instead of returning an error (e.g. a snapshot
    /// naming log segments a truncated `db` no longer has); caught and treated as damage.
    #[error("spool store {path}: sled panicked reading it ({message}): the store is damaged")]
    Panicked { path: String, message: String },
}

impl SpoolError {
    /// The store itself failed (I/O, sled): it is closed and reopened from disk.
    fn is_store_failure(&self) -> bool {
        matches!(
            self,
            SpoolError::Store { .. } | SpoolError::Sync { .. } | SpoolError::Panicked { .. }
        )
    }

    /// Nothing could be read or written because the store failed or is closed.
    fn is_unavailable(&self) -> bool {
        self.is_store_failure() || matches!(self, SpoolError::Unavailable { .. })
    }

    /// Open failed for a reason that says nothing about the store's contents: no space
    /// left, or another process holds its lock. Such a store is never set aside.
    pub fn keeps_store_in_place(&self) -> bool {
        use std::io::ErrorKind;
        let io = match self {
            SpoolError::Store {
                source: sled::Error::Io(e),
                ..
            }
            | SpoolError::Sync { source: e, .. } => e,
            _ => return false,
        };
        matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
            || io.to_string().contains("could not acquire lock")
    }
}

/// An input or event that could not be delivered, kept with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub at_ms: i64,
    /// `normalize` (could not decode) or `upload` (CHeKT rejected it).
    pub stage: String,
    pub reason: String,
    pub topic: String,
    /// The original message bytes (normalize) or the request body (upload).
    pub payload: Vec<u8>,
    pub event: Option<Event>,
}

/// Position of a queued event; pass it back to `ack` / `dead_letter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueKey(Vec<u8>);

impl QueueKey {
    pub fn class(&self) -> Option<Class> {
        self.0.get(1).and_then(|c| Class::from_u8(*c))
    }
    pub fn seq(&self) -> u64 {
        self.0
            .get(2..10)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    }
}

/// Why the store was replaced at open.
#[derive(Clone, Debug)]
pub struct Reset {
    pub moved_to: PathBuf,
    pub error: String,
}

/// Counters for status lines, troubles and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub queued: [u64; 4],
    pub live_bytes: u64,
    pub dropped: [u64; 4],
    pub dead_letters: u64,
    /// Times the store failed while running and was closed (since start).
    pub store_failures: u64,
    /// The store is closed after a failure and not reopened yet.
    pub unavailable: bool,
}

impl Stats {
    pub fn backlog(&self) -> u64 {
        self.queued.iter().sum()
    }
}

/// What a commit did besides storing the batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitReport {
    pub stored: u64,
    /// Evicted to stay within the byte budget, per class.
    pub dropped: [u64; 4],
}

#[derive(Default)]
struct State {
    next_seq: u64,
    queued: [u64; 4],
    bytes: [u64; 4],
    dropped: [u64; 4],
    dead: u64,
    /// Recent tags (see the layout) and the sequence number of their `t` key.
    recent: std::collections::HashMap<Vec<u8>, u64>,
    /// `t` keys in the store (a tag spooled twice has two).
    recent_keys: usize,
}

impl State {
    fn live_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

/// Events to store in one durable step. Cloned to commit the same batch again after a
/// failed commit (the same keys and events: nothing stored twice).
#[derive(Clone, Default)]
pub struct Batch {
    ops: sled::Batch,
    /// Queue key, class, encoded length.
    added: Vec<(Vec<u8>, Class, u64)>,
    dead: Vec<Vec<u8>>,
    /// `t` key and tag.
    recent: Vec<(Vec<u8>, Vec<u8>)>,
    /// `Health::failures` when the batch was made: a later failure means it may be on disk
    /// already (partly or wholly).
    failures_seen: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.dead.is_empty() && self.recent.is_empty()
    }
}

/// The open sled store.
struct Store {
    db: sled::Db,
    log_file: File,
    generation: u64,
}

/// Store failures and reopen attempts.
struct Health {
    failures: u64,
    last_failure: Option<Instant>,
    generation: u64,
    next_try: Instant,
    backoff: Duration,
    attempts: u32,
}

const REOPEN_FIRST: Duration = Duration::from_millis(250);
const REOPEN_MAX: Duration = Duration::from_secs(10);

pub struct Spool {
    /// `None` after a store failure, until reopened.
    store: RwLock<Option<Store>>,
    dir: PathBuf,
    cfg: SpoolConfig,
    state: Mutex<State>,
    health: Mutex<Health>,
    notify: tokio::sync::Notify,
}

fn store_err(dir: &Path) -> impl Fn(sled::Error) -> SpoolError + '_ {
    move |source| SpoolError::Store {
        path: dir.display().to_string(),
        source,
    }
}

fn qkey(class: Class, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(10);
    k.push(b'q');
    k.push(class.as_u8());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, SpoolError> {
    let mut out = vec![VERSION];
    out.extend(postcard::to_stdvec(v).map_err(|e| SpoolError::Encode(e.to_string()))?);
    Ok(out)
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown record version {v}")),
        None => Err("empty record".into()),
    }
}

fn be_u64(b: &[u8]) -> u64 {
    b.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// Open sled at `cfg.dir` and read every key back once: counts the backlog and proves the
/// store is readable.
/// [`open_store_inner`], with a panic inside sled turned into [`SpoolError::Panicked`] so
/// that a damaged store is set aside instead of killing the process at every start.
fn open_store(cfg: &SpoolConfig) -> Result<(sled::Db, File, State), SpoolError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_store_inner(cfg))).unwrap_or_else(
        |payload| {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message")
                .to_string();
            Err(SpoolError::Panicked {
                path: cfg.dir.display().to_string(),
                message,
            })
        },
    )
}

fn open_store_inner(cfg: &SpoolConfig) -> Result<(sled::Db, File, State), SpoolError> {
    let dir = &cfg.dir;
    let err = store_err(dir);
    std::fs::create_dir_all(dir).map_err(|e| err(sled::Error::Io(e)))?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(cfg.cache_bytes)
        .flush_every_ms(Some(1000))
        .open()
        .map_err(&err)?;
    let log_file = File::open(dir.join("db")).map_err(|e| err(sled::Error::Io(e)))?;
    let mut st = State::default();
    for item in db.iter() {
        let (k, v) = item.map_err(&err)?;
        match k.first() {
            Some(b'q') => {
                let class = k
                    .get(1)
                    .and_then(|c| Class::from_u8(*c))
                    .ok_or_else(|| err(sled::Error::Unsupported("bad queue key".into())))?;
                st.queued[class as usize] += 1;
                st.bytes[class as usize] += v.len() as u64;
            }
            Some(b'd') => st.dead += 1,
            Some(b't') => {
                let seq = k.get(1..9).map(be_u64).unwrap_or(0);
                st.recent.insert(v.to_vec(), seq);
                st.recent_keys += 1;
            }
            _ => {}
        }
    }
    if let Some(v) = db.get(b"mseq").map_err(&err)? {
        st.next_seq = be_u64(&v);
    }
    for c in Class::ALL {
        if let Some(v) = db.get(drop_key(c)).map_err(&err)? {
            st.dropped[c as usize] = be_u64(&v);
        }
    }
    db.flush().map_err(&err)?;
    log_file.sync_data().map_err(|source| SpoolError::Sync {
        path: dir.display().to_string(),
        source,
    })?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((db, log_file, st))
}

impl Spool {
    /// Open the store at `cfg.dir`; set an unreadable one aside and start fresh.
    pub fn open(cfg: &SpoolConfig) -> Result<(Spool, Option<Reset>), SpoolError> {
        match Spool::open_checked(cfg) {
            Ok(s) => Ok((s, None)),
            Err(first) if first.keeps_store_in_place() => Err(first),
            Err(first) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let name = format!(
                    "{}.corrupt-{stamp}",
                    cfg.dir
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("spool")
                );
                let moved_to = cfg.dir.with_file_name(name);
                std::fs::rename(&cfg.dir, &moved_to).map_err(|source| SpoolError::SetAside {
                    path: cfg.dir.display().to_string(),
                    source,
                })?;
                tracing::error!(
                    error = %first,
                    moved_to = %moved_to.display(),
                    "spool store unreadable: set it aside and started a fresh one"
                );
                let s = Spool::open_checked(cfg)?;
                Ok((
                    s,
                    Some(Reset {
                        moved_to,
                        error: first.to_string(),
                    }),
                ))
            }
        }
    }

    fn open_checked(cfg: &SpoolConfig) -> Result<Spool, SpoolError> {
        let (db, log_file, st) = open_store(cfg)?;
        Ok(Spool {
            store: RwLock::new(Some(Store {
                db,
                log_file,
                generation: 0,
            })),
            dir: cfg.dir.clone(),
            cfg: cfg.clone(),
            state: Mutex::new(st),
            health: Mutex::new(Health {
                failures: 0,
                last_failure: None,
                generation: 0,
                next_try: Instant::now(),
                backoff: REOPEN_FIRST,
                attempts: 0,
            }),
            notify: tokio::sync::Notify::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the counters are still consistent
        // enough to keep going (they are recomputed at the next open).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_read(&self) -> std::sync::RwLockReadGuard<'_, Option<Store>> {
        self.store.read().unwrap_or_else(|p| p.into_inner())
    }

    fn slot_write(&self) -> std::sync::RwLockWriteGuard<'_, Option<Store>> {
        self.store.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the open store. A store failure closes the store (see module doc); a
    /// closed store is reopened first when a retry is due.
    fn with_store<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        self.reopen_if_due();
        let slot = self.slot_read();
        let Some(store) = slot.as_ref() else {
            return Err(SpoolError::Unavailable {
                path: self.dir.display().to_string(),
            });
        };
        let generation = store.generation;
        let r = f(store);
        drop(slot);
        if let Err(e) = &r
            && e.is_store_failure()
        {
            self.close(generation, e);
        }
        r
    }

    /// Drop the failed store (sled's file lock goes with it) so it can be reopened.
    fn close(&self, generation: u64, e: &SpoolError) {
        let mut slot = self.slot_write();
        if slot.as_ref().is_none_or(|s| s.generation != generation) {
            return; // already closed (and maybe reopened) by another caller
        }
        *slot = None;
        drop(slot);
        let mut h = self.health();
        h.failures += 1;
        let now = Instant::now();
        // Reopen at once, unless the store failed again soon after the last reopen: then
        // keep backing off (a store that fails on every use is not reopened in a loop).
        if h.last_failure
            .is_some_and(|t| now - t < Duration::from_secs(60))
        {
            h.next_try = now + h.backoff;
            h.backoff = (h.backoff * 2).min(REOPEN_MAX);
        } else {
            h.next_try = now;
            h.backoff = REOPEN_FIRST;
        }
        h.last_failure = Some(now);
        h.attempts = 0;
        tracing::error!(error = %e, "spool store failed: closed it; reopening it from what is on disk (messages are not acknowledged meanwhile)");
    }

    fn reopen_if_due(&self) {
        if self.slot_read().is_some() {
            return;
        }
        {
            let mut h = self.health();
            let now = Instant::now();
            if now < h.next_try {
                return;
            }
            h.next_try = now + h.backoff;
            h.backoff = (h.backoff * 2).min(REOPEN_MAX);
            h.attempts += 1;
        }
        let mut slot = self.slot_write();
        if slot.is_some() {
            return;
        }
        match open_store(&self.cfg) {
            Ok((db, log_file, fresh)) => {
                let generation = {
                    let mut h = self.health();
                    h.generation += 1;
                    h.attempts = 0;
                    h.generation
                };
                {
                    let mut st = self.state();
                    let next_seq = st.next_seq.max(fresh.next_seq);
                    *st = fresh;
                    st.next_seq = next_seq;
                }
                *slot = Some(Store {
                    db,
                    log_file,
                    generation,
                });
                drop(slot);
                tracing::warn!(dir = %self.dir.display(), "spool store reopened");
                self.notify.notify_waiters();
                self.notify.notify_one();
            }
            Err(e) => {
                drop(slot);
                let attempts = self.health().attempts;
                if attempts.is_power_of_two() {
                    tracing::warn!(error = %e, attempts, "spool store still cannot be reopened; will retry");
                } else {
                    tracing::debug!(error = %e, attempts, "spool store still cannot be reopened; will retry");
                }
            }
        }
    }

    /// A new, never reused message number (persisted with the next commit).
    pub fn next_msg_id(&self) -> u64 {
        let mut st = self.state();
        let id = st.next_seq;
        st.next_seq += 1;
        id
    }

    /// True if `tag` (a message digest or event identity) was spooled recently.
    pub fn seen_recently(&self, tag: &[u8]) -> Result<bool, SpoolError> {
        Ok(self.state().recent.contains_key(tag))
    }

    pub fn batch(&self) -> Batch {
        Batch {
            failures_seen: self.health().failures,
            ..Batch::default()
        }
    }

    /// Add an event to `batch`.
    pub fn push_event(&self, batch: &mut Batch, event: &Event) -> Result<(), SpoolError> {
        let seq = self.next_msg_id();
        let v = encode(event)?;
        let k = qkey(event.class, seq);
        batch.added.push((k.clone(), event.class, v.len() as u64));
        batch.ops.insert(k, v);
        Ok(())
    }

    /// Add a dead letter to `batch`.
    pub fn push_dead(&self, batch: &mut Batch, dl: &DeadLetter) -> Result<(), SpoolError> {
        let seq = self.next_msg_id();
        let mut k = vec![b'd'];
        k.extend_from_slice(&seq.to_be_bytes());
        batch.ops.insert(k.clone(), encode(dl)?);
        batch.dead.push(k);
        Ok(())
    }

    /// Remember that `tag` (a message digest or event identity) is in this batch.
    pub fn push_recent(&self, batch: &mut Batch, tag: &[u8]) {
        let seq = self.next_msg_id();
        let mut t = Vec::with_capacity(9);
        t.push(b't');
        t.extend_from_slice(&seq.to_be_bytes());
        batch.ops.insert(t.clone(), tag);
        batch.recent.push((t, tag.to_vec()));
    }

    /// Store `batch` durably (fdatasync) and enforce the byte budget. Only after `Ok` may
    /// the messages in it be acknowledged to the broker. After an error the same batch (a
    /// clone) may be committed again.
    pub fn commit(&self, batch: Batch) -> Result<CommitReport, SpoolError> {
        let report = self.with_store(|s| self.commit_in(s, batch))?;
        if report.stored > 0 {
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
        Ok(report)
    }

    fn commit_in(&self, s: &Store, batch: Batch) -> Result<CommitReport, SpoolError> {
        let err = store_err(&self.dir);
        // After a store failure this batch may already be on disk: count only what is new.
        let again = self.health().failures > batch.failures_seen;
        let is_new = |k: &Vec<u8>| -> Result<bool, SpoolError> {
            Ok(!again || !s.db.contains_key(k).map_err(&err)?)
        };
        let mut added = Vec::with_capacity(batch.added.len());
        for (k, c, n) in &batch.added {
            if is_new(k)? {
                added.push((*c, *n));
            }
        }
        let mut dead = 0;
        for k in &batch.dead {
            dead += u64::from(is_new(k)?);
        }

        let mut ops = batch.ops;
        let next_seq = self.state().next_seq;
        ops.insert(&b"mseq"[..], &next_seq.to_be_bytes()[..]);
        s.db.apply_batch(ops).map_err(&err)?;
        let mut report = CommitReport::default();
        {
            let mut st = self.state();
            for (c, n) in &added {
                st.queued[*c as usize] += 1;
                st.bytes[*c as usize] += n;
            }
            st.dead += dead;
            for (k, tag) in &batch.recent {
                if !again || st.recent.get(tag) != k.get(1..9).map(be_u64).as_ref() {
                    st.recent_keys += 1;
                }
                st.recent
                    .insert(tag.clone(), k.get(1..9).map(be_u64).unwrap_or(0));
            }
        }
        report.stored = batch.added.len() as u64;
        self.enforce_budget(s, &mut report)?;
        self.prune(s)?;
        self.sync_in(s)?;
        Ok(report)
    }

    fn enforce_budget(&self, s: &Store, report: &mut CommitReport) -> Result<(), SpoolError> {
        let err = store_err(&self.dir);
        loop {
            let victim_class = {
                let st = self.state();
                if st.live_bytes() <= self.cfg.max_bytes {
                    break;
                }
                Class::ALL
                    .iter()
                    .rev()
                    .copied()
                    .find(|c| st.queued[*c as usize] > 0)
            };
            let Some(class) = victim_class else { break };
            let Some((k, v)) =
                s.db.scan_prefix([b'q', class.as_u8()])
                    .next()
                    .transpose()
                    .map_err(&err)?
            else {
                break;
            };
            s.db.remove(&k).map_err(&err)?;
            let mut st = self.state();
            st.queued[class as usize] = st.queued[class as usize].saturating_sub(1);
            st.bytes[class as usize] = st.bytes[class as usize].saturating_sub(v.len() as u64);
            st.dropped[class as usize] += 1;
            report.dropped[class as usize] += 1;
            let total = st.dropped[class as usize];
            drop(st);
            s.db.insert(drop_key(class), &total.to_be_bytes()[..])
                .map_err(&err)?;
        }
        Ok(())
    }

    /// Keep the dead-letter store and the redelivery index within their caps.
    fn prune(&self, s: &Store) -> Result<(), SpoolError> {
        let err = store_err(&self.dir);
        loop {
            let over = {
                let st = self.state();
                st.dead > self.cfg.max_dead_letters
            };
            if !over {
                break;
            }
            match s.db.scan_prefix(b"d").next().transpose().map_err(&err)? {
                Some((k, _)) => {
                    s.db.remove(k).map_err(&err)?;
                    let mut st = self.state();
                    st.dead -= 1;
                    tracing::warn!("dead-letter store full: removed the oldest dead letter");
                }
                None => break,
            }
        }
        // Oldest `t` keys first; a tag seen again later keeps its newer key in memory.
        let excess = self.state().recent_keys.saturating_sub(RECENT_MAX);
        if excess > 0 {
            let old: Vec<(sled::IVec, sled::IVec)> =
                s.db.scan_prefix(b"t")
                    .take(excess)
                    .collect::<Result<_, _>>()
                    .map_err(&err)?;
            let mut b = sled::Batch::default();
            let mut st = self.state();
            for (k, tag) in old {
                let seq = k.get(1..9).map(be_u64).unwrap_or(0);
                if st.recent.get(tag.as_ref()) == Some(&seq) {
                    st.recent.remove(tag.as_ref());
                }
                b.remove(k);
                st.recent_keys = st.recent_keys.saturating_sub(1);
            }
            drop(st);
            s.db.apply_batch(b).map_err(&err)?;
        }
        Ok(())
    }

    /// Make everything written so far durable: sled flush, then fdatasync of its log.
    pub fn sync(&self) -> Result<(), SpoolError> {
        self.with_store(|s| self.sync_in(s))
    }

    fn sync_in(&self, s: &Store) -> Result<(), SpoolError> {
        s.db.flush().map_err(store_err(&self.dir))?;
        s.log_file.sync_data().map_err(|source| SpoolError::Sync {
            path: self.dir.display().to_string(),
            source,
        })
    }

    /// The next event to deliver: the oldest of the highest class. Undecodable records are
    /// moved to the dead-letter store on the way. While the store is unavailable (see
    /// module doc) there is nothing to deliver.
    pub fn peek(&self) -> Result<Option<(QueueKey, Event)>, SpoolError> {
        match self.with_store(|s| self.peek_in(s)) {
            Err(e) if e.is_unavailable() => Ok(None),
            r => r,
        }
    }

    fn peek_in(&self, s: &Store) -> Result<Option<(QueueKey, Event)>, SpoolError> {
        let err = store_err(&self.dir);
        loop {
            let Some((k, v)) = s.db.scan_prefix(b"q").next().transpose().map_err(&err)? else {
                return Ok(None);
            };
            let key = QueueKey(k.to_vec());
            match decode::<Event>(&v) {
                Ok(ev) => return Ok(Some((key, ev))),
                Err(e) => {
                    tracing::error!(seq = key.seq(), error = %e, "undecodable spool record moved to dead letters");
                    let dl = DeadLetter {
                        at_ms: 0,
                        stage: "spool".into(),
                        reason: format!("undecodable spool record: {e}"),
                        topic: String::new(),
                        payload: v.to_vec(),
                        event: None,
                    };
                    self.move_to_dead(s, &key, v.len() as u64, &dl)?;
                }
            }
        }
    }

    /// Wait until something may have been appended.
    pub async fn appended(&self) {
        self.notify.notified().await
    }

    /// CHeKT accepted the event: delete it. If the store is unavailable the event stays
    /// queued and is sent again later under the same `Idempotency-Key`.
    pub fn ack(&self, key: &QueueKey) -> Result<(), SpoolError> {
        let r = self.with_store(|s| {
            if let Some(v) = s.db.remove(&key.0).map_err(store_err(&self.dir))?
                && let Some(c) = key.class()
            {
                let mut st = self.state();
                st.queued[c as usize] = st.queued[c as usize].saturating_sub(1);
                st.bytes[c as usize] = st.bytes[c as usize].saturating_sub(v.len() as u64);
            }
            Ok(())
        });
        match r {
            Err(e) if e.is_unavailable() => {
                tracing::warn!(seq = key.seq(), error = %e, "delivered event not removed (store unavailable); it will be sent again under the same Idempotency-Key");
                Ok(())
            }
            r => r,
        }
    }

    /// CHeKT rejected the event permanently: move it to the dead-letter store. If the store
    /// is unavailable the event stays queued (and is tried again later).
    pub fn dead_letter(&self, key: &QueueKey, dl: &DeadLetter) -> Result<(), SpoolError> {
        let r = self.with_store(|s| {
            let len =
                s.db.get(&key.0)
                    .map_err(store_err(&self.dir))?
                    .map(|v| v.len() as u64)
                    .unwrap_or(0);
            self.move_to_dead(s, key, len, dl)
        });
        match r {
            Err(e) if e.is_unavailable() => {
                tracing::warn!(seq = key.seq(), error = %e, "rejected event not moved to dead letters (store unavailable); it stays queued");
                Ok(())
            }
            r => r,
        }
    }

    fn move_to_dead(
        &self,
        s: &Store,
        key: &QueueKey,
        len: u64,
        dl: &DeadLetter,
    ) -> Result<(), SpoolError> {
        let mut b = sled::Batch::default();
        b.remove(key.0.clone());
        let mut k = vec![b'd'];
        k.extend_from_slice(&self.next_msg_id().to_be_bytes());
        b.insert(k, encode(dl)?);
        s.db.apply_batch(b).map_err(store_err(&self.dir))?;
        let mut st = self.state();
        if let Some(c) = key.class() {
            st.queued[c as usize] = st.queued[c as usize].saturating_sub(1);
            st.bytes[c as usize] = st.bytes[c as usize].saturating_sub(len);
        }
        st.dead += 1;
        Ok(())
    }

    /// All dead letters, oldest first. Undecodable ones are reported as such.
    pub fn dead_letters(&self) -> Result<Vec<Result<DeadLetter, String>>, SpoolError> {
        self.with_store(|s| {
            s.db.scan_prefix(b"d")
                .map(|r| {
                    r.map(|(_, v)| decode::<DeadLetter>(&v))
                        .map_err(store_err(&self.dir))
                })
                .collect()
        })
    }

    /// Queued events in delivery order (for `spool list` and tests).
    pub fn queued(&self, limit: usize) -> Result<Vec<Result<Event, String>>, SpoolError> {
        self.with_store(|s| {
            s.db.scan_prefix(b"q")
                .take(limit)
                .map(|r| {
                    r.map(|(_, v)| decode::<Event>(&v))
                        .map_err(store_err(&self.dir))
                })
                .collect()
        })
    }

    pub fn stats(&self) -> Stats {
        let unavailable = self.slot_read().is_none();
        let store_failures = self.health().failures;
        let st = self.state();
        Stats {
            queued: st.queued,
            live_bytes: st.live_bytes(),
            dropped: st.dropped,
            dead_letters: st.dead,
            store_failures,
            unavailable,
        }
    }

    /// Bytes sled's files take on disk.
    pub fn disk_bytes(&self) -> u64 {
        dir_size(&self.dir)
    }
}

fn drop_key(c: Class) -> Vec<u8> {
    vec![b'm', b'd', b'r', b'o', b'p', c.as_u8()]
}

/// Bytes the files below `p` take (recursively); unreadable entries count 0.
pub fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventStatus, EventType};

    /// Open, retrying briefly while sled's background thread of a store dropped a moment
    /// ago in this process still holds its file lock (sled 0.34 releases it late).
    fn reopen(c: &SpoolConfig) -> (Spool, Option<Reset>) {
        let start = std::time::Instant::now();
        loop {
            match Spool::open(c) {
                Ok(r) => return r,
                Err(e) if e.keeps_store_in_place() && start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    pub(crate) fn cfg(dir: &Path, max_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.join("spool"),
            max_bytes,
            cache_bytes: 1 << 20,
            max_batch: 512,
            max_dead_letters: 100,
        }
    }

    fn ev(class: Class, n: u32) -> Event {
        let t = match class {
            Class::Alarm => EventType::Alarm,
            Class::Trouble => EventType::Trouble,
            _ => EventType::Arming,
        };
        Event {
            id: format!("{:032x}", n),
            class,
            event_type: t,
            status: EventStatus::Active,
            location_id: "L".into(),
            recorder_id: None,
            device_id: "d".into(),
            zone: None,
            partition: None,
            user: None,
            camera_ids: vec![],
            code: None,
            description: "x".repeat(100),
            device_time_ms: None,
            received_at_ms: n as i64,
        }
    }

    fn put(s: &Spool, events: &[Event]) -> CommitReport {
        let mut b = s.batch();
        for e in events {
            s.push_event(&mut b, e).unwrap();
        }
        s.commit(b).unwrap()
    }

    #[test]
    fn delivers_by_class_then_fifo_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20);
        {
            let (s, reset) = reopen(&c);
            assert!(reset.is_none());
            put(
                &s,
                &[
                    ev(Class::Other, 1),
                    ev(Class::Arming, 2),
                    ev(Class::Alarm, 3),
                    ev(Class::Alarm, 4),
                ],
            );
        }
        let (s, _) = reopen(&c);
        assert_eq!(s.stats().backlog(), 4);
        let mut order = vec![];
        while let Some((k, e)) = s.peek().unwrap() {
            order.push(e.received_at_ms);
            s.ack(&k).unwrap();
        }
        assert_eq!(order, vec![3, 4, 2, 1]);
        assert_eq!(s.stats().live_bytes, 0);
    }

    #[test]
    fn budget_drops_lowest_class_oldest_first_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 64 * 1024);
        let (s, _) = reopen(&c);
        let alarms: Vec<Event> = (0..100).map(|i| ev(Class::Alarm, i)).collect();
        put(&s, &alarms);
        let routine: Vec<Event> = (1000..2000).map(|i| ev(Class::Other, i)).collect();
        let r = put(&s, &routine);
        assert!(r.dropped[Class::Other as usize] > 0);
        assert_eq!(r.dropped[Class::Alarm as usize], 0);
        let st = s.stats();
        assert_eq!(st.queued[Class::Alarm as usize], 100);
        assert!(st.live_bytes <= 64 * 1024);
        // the oldest routine events went first
        let q = s.queued(10_000).unwrap();
        let first_other = q
            .iter()
            .flatten()
            .find(|e| e.class == Class::Other)
            .unwrap();
        assert!(first_other.received_at_ms > 1000);
        drop(s);
        let (s, _) = reopen(&c);
        assert_eq!(s.stats().dropped, st.dropped, "drop counters persist");
    }

    #[test]
    fn recent_tags_survive_reopen_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20);
        {
            let (s, _) = reopen(&c);
            let mut b = s.batch();
            s.push_recent(&mut b, b"mfirst");
            s.commit(b).unwrap();
            assert!(s.seen_recently(b"mfirst").unwrap());
            assert!(!s.seen_recently(b"mother").unwrap());
        }
        let (s, _) = reopen(&c);
        assert!(
            s.seen_recently(b"mfirst").unwrap(),
            "durable across restarts"
        );
        // The same tag again and again, and many new ones: the store keeps RECENT_MAX keys.
        for round in 0..3 {
            let mut b = s.batch();
            for i in 0..RECENT_MAX {
                s.push_recent(&mut b, b"mrepeat");
                s.push_recent(&mut b, format!("m{round}-{i}").as_bytes());
            }
            s.commit(b).unwrap();
        }
        let keys = s
            .with_store(|st| Ok(st.db.scan_prefix(b"t").count()))
            .unwrap();
        assert_eq!(keys, RECENT_MAX);
        assert!(s.seen_recently(b"mrepeat").unwrap());
        assert!(
            !s.seen_recently(b"mfirst").unwrap(),
            "the oldest were pruned"
        );
        assert!(
            s.seen_recently(format!("m2-{}", RECENT_MAX - 1).as_bytes())
                .unwrap()
        );
    }

    #[test]
    fn corrupt_store_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20);
        {
            let (s, _) = reopen(&c);
            put(&s, &[ev(Class::Alarm, 1)]);
        }
        std::fs::write(c.dir.join("conf"), b"garbage that is not a sled config").unwrap();
        std::fs::write(c.dir.join("db"), vec![0xAB; 4096]).unwrap();
        let (s, reset) = reopen(&c);
        let reset = reset.expect("store was reset");
        assert!(reset.moved_to.exists());
        assert_eq!(s.stats().backlog(), 0);
    }

    /// sled 0.34 panics (index out of bounds in segment recovery) when a snapshot names
    /// log segments that a truncated `db` no longer has; found by torture case 4. The
    /// fixture is such a store (written by sled, reopened so its snapshot covers six
    /// segments, then `db` cut to 768 KiB): opening it panics inside sled on every run.
    #[test]
    fn a_store_sled_panics_on_is_set_aside() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sled-panics-at-open");
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 30);
        std::fs::create_dir_all(&c.dir).unwrap();
        for f in std::fs::read_dir(&fixture).unwrap().flatten() {
            std::fs::copy(f.path(), c.dir.join(f.file_name())).unwrap();
        }
        let (s, reset) = reopen(&c);
        let reset = reset.expect("store was set aside");
        assert!(reset.error.contains("sled panicked"), "{}", reset.error);
        assert!(reset.moved_to.join("db").exists(), "damaged store kept");
        assert_eq!(s.stats().backlog(), 0);
        put(&s, &[ev(Class::Alarm, 1)]);
        assert_eq!(s.stats().backlog(), 1, "the fresh store works");
    }

    #[test]
    fn a_store_locked_by_another_process_is_not_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20);
        let (s, _) = reopen(&c);
        put(&s, &[ev(Class::Alarm, 1)]);
        // A second open (`spool status` while the agent runs) must fail, not move it away.
        let e = Spool::open(&c).err().expect("the store is locked");
        assert!(e.keeps_store_in_place(), "{e}");
        assert!(c.dir.join("db").exists());
        let siblings = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(siblings, 1, "nothing set aside");
        assert_eq!(s.stats().backlog(), 1);
    }
}
