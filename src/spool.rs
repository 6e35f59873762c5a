//! The spool: the agent's only durable state besides its keys. It owns sled; no other
//! module touches the store.
//!
//! # On-disk layout (one sled tree; keys are byte strings)
//! - `q` ‖ class (u8) ‖ seq (u64 BE) → queued event: `VERSION` ‖ postcard([`Event`]).
//!   Iteration order is class, then seq: delivery order (alarm first, FIFO within a class).
//! - `d` ‖ seq (u64 BE) → dead letter: `VERSION` ‖ postcard([`DeadLetter`]).
//! - `r` ‖ tag → receipt time (i64 BE): messages (`m` ‖ 16-byte digest) and event
//!   identities (`e` ‖ id) recently spooled, so a broker's redelivery (MQTT DUP) or a
//!   device's republish of something already durable is recognised and not spooled twice.
//! - `t` ‖ time (i64 BE) ‖ tag → () : age index of `r`, for pruning.
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
//!   and a fresh one started; the caller is told so it can report it. Never a crash loop.
//! - Memory: sled's cache is set small (`spool.cache_bytes`); nothing here loads the
//!   backlog into memory (open counts it by iterating keys and value lengths).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::SpoolConfig;
use crate::event::{Class, Event};

/// Record format version, first byte of every value.
const VERSION: u8 = 1;
/// How many recent message digests are kept for redelivery detection.
const RECENT_MAX: u64 = 20_000;

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
    recent: u64,
}

impl State {
    fn live_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }
}

/// Events to store in one durable step.
#[derive(Default)]
pub struct Batch {
    ops: sled::Batch,
    added: Vec<(Class, u64)>,
    dead: u64,
    recent: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.dead == 0 && self.recent == 0
    }
}

pub struct Spool {
    db: sled::Db,
    dir: PathBuf,
    log_file: File,
    cfg: SpoolConfig,
    state: Mutex<State>,
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

impl Spool {
    /// Open the store at `cfg.dir`; set an unreadable one aside and start fresh.
    pub fn open(cfg: &SpoolConfig) -> Result<(Spool, Option<Reset>), SpoolError> {
        match Spool::open_checked(cfg) {
            Ok(s) => Ok((s, None)),
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
        let dir = cfg.dir.clone();
        let dir_for_err = dir.clone();
        let err = store_err(&dir_for_err);
        std::fs::create_dir_all(&dir).map_err(|e| err(sled::Error::Io(e)))?;
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(cfg.cache_bytes)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(&err)?;
        let log_file = File::open(dir.join("db")).map_err(|e| err(sled::Error::Io(e)))?;
        // Read every key back once: counts the backlog and proves the store is readable.
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
                Some(b'r') => st.recent += 1,
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
        let s = Spool {
            db,
            dir,
            log_file,
            cfg: cfg.clone(),
            state: Mutex::new(st),
            notify: tokio::sync::Notify::new(),
        };
        s.sync()?;
        if let Ok(d) = File::open(&s.dir) {
            let _ = d.sync_all();
        }
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the counters are still consistent
        // enough to keep going (they are recomputed at the next open).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new, never reused message number (persisted with the next commit).
    pub fn next_msg_id(&self) -> u64 {
        let mut st = self.state();
        let id = st.next_seq;
        st.next_seq += 1;
        id
    }

    /// True if a message with this digest was spooled recently (a redelivery).
    pub fn seen_recently(&self, digest: &[u8]) -> Result<bool, SpoolError> {
        let mut k = Vec::with_capacity(17);
        k.push(b'r');
        k.extend_from_slice(digest);
        self.db.contains_key(k).map_err(store_err(&self.dir))
    }

    pub fn batch(&self) -> Batch {
        Batch::default()
    }

    /// Add an event to `batch`.
    pub fn push_event(&self, batch: &mut Batch, event: &Event) -> Result<(), SpoolError> {
        let seq = self.next_msg_id();
        let v = encode(event)?;
        batch.added.push((event.class, v.len() as u64));
        batch.ops.insert(qkey(event.class, seq), v);
        Ok(())
    }

    /// Add a dead letter to `batch`.
    pub fn push_dead(&self, batch: &mut Batch, dl: &DeadLetter) -> Result<(), SpoolError> {
        let seq = self.next_msg_id();
        let mut k = vec![b'd'];
        k.extend_from_slice(&seq.to_be_bytes());
        batch.ops.insert(k, encode(dl)?);
        batch.dead += 1;
        Ok(())
    }

    /// Remember that the message with `digest` is in this batch.
    pub fn push_recent(&self, batch: &mut Batch, digest: &[u8], at_ms: i64) {
        let mut r = vec![b'r'];
        r.extend_from_slice(digest);
        batch.ops.insert(r, &at_ms.to_be_bytes()[..]);
        let mut t = vec![b't'];
        t.extend_from_slice(&at_ms.to_be_bytes());
        t.extend_from_slice(digest);
        batch.ops.insert(t, &[][..]);
        batch.recent += 1;
    }

    /// Store `batch` durably (fdatasync) and enforce the byte budget. Only after `Ok` may
    /// the messages in it be acknowledged to the broker.
    pub fn commit(&self, mut batch: Batch) -> Result<CommitReport, SpoolError> {
        let err = store_err(&self.dir);
        let next_seq = self.state().next_seq;
        batch.ops.insert(&b"mseq"[..], &next_seq.to_be_bytes()[..]);
        self.db.apply_batch(batch.ops).map_err(&err)?;
        let mut report = CommitReport::default();
        {
            let mut st = self.state();
            for (c, n) in &batch.added {
                st.queued[*c as usize] += 1;
                st.bytes[*c as usize] += n;
            }
            report.stored = batch.added.len() as u64;
            st.dead += batch.dead;
            st.recent += batch.recent;
        }
        self.enforce_budget(&mut report)?;
        self.prune()?;
        self.sync()?;
        if report.stored > 0 {
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
        Ok(report)
    }

    fn enforce_budget(&self, report: &mut CommitReport) -> Result<(), SpoolError> {
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
            let Some((k, v)) = self
                .db
                .scan_prefix([b'q', class.as_u8()])
                .next()
                .transpose()
                .map_err(&err)?
            else {
                break;
            };
            self.db.remove(&k).map_err(&err)?;
            let mut st = self.state();
            st.queued[class as usize] = st.queued[class as usize].saturating_sub(1);
            st.bytes[class as usize] = st.bytes[class as usize].saturating_sub(v.len() as u64);
            st.dropped[class as usize] += 1;
            report.dropped[class as usize] += 1;
            let total = st.dropped[class as usize];
            drop(st);
            self.db
                .insert(drop_key(class), &total.to_be_bytes()[..])
                .map_err(&err)?;
        }
        Ok(())
    }

    /// Keep the dead-letter store and the redelivery index within their caps.
    fn prune(&self) -> Result<(), SpoolError> {
        let err = store_err(&self.dir);
        loop {
            let over = {
                let st = self.state();
                st.dead > self.cfg.max_dead_letters
            };
            if !over {
                break;
            }
            match self.db.scan_prefix(b"d").next().transpose().map_err(&err)? {
                Some((k, _)) => {
                    self.db.remove(k).map_err(&err)?;
                    let mut st = self.state();
                    st.dead -= 1;
                    tracing::warn!("dead-letter store full: removed the oldest dead letter");
                }
                None => break,
            }
        }
        loop {
            if self.state().recent <= RECENT_MAX {
                break;
            }
            match self.db.scan_prefix(b"t").next().transpose().map_err(&err)? {
                Some((k, _)) => {
                    let mut r = vec![b'r'];
                    r.extend_from_slice(k.get(9..).unwrap_or_default());
                    self.db.remove(&k).map_err(&err)?;
                    self.db.remove(r).map_err(&err)?;
                    self.state().recent -= 1;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Make everything written so far durable: sled flush, then fdatasync of its log.
    pub fn sync(&self) -> Result<(), SpoolError> {
        self.db.flush().map_err(store_err(&self.dir))?;
        self.log_file
            .sync_data()
            .map_err(|source| SpoolError::Sync {
                path: self.dir.display().to_string(),
                source,
            })
    }

    /// The next event to deliver: the oldest of the highest class. Undecodable records are
    /// moved to the dead-letter store on the way.
    pub fn peek(&self) -> Result<Option<(QueueKey, Event)>, SpoolError> {
        let err = store_err(&self.dir);
        loop {
            let Some((k, v)) = self.db.scan_prefix(b"q").next().transpose().map_err(&err)? else {
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
                    self.move_to_dead(&key, v.len() as u64, &dl)?;
                }
            }
        }
    }

    /// Wait until something may have been appended.
    pub async fn appended(&self) {
        self.notify.notified().await
    }

    /// CHeKT accepted the event: delete it.
    pub fn ack(&self, key: &QueueKey) -> Result<(), SpoolError> {
        if let Some(v) = self.db.remove(&key.0).map_err(store_err(&self.dir))?
            && let Some(c) = key.class()
        {
            let mut st = self.state();
            st.queued[c as usize] = st.queued[c as usize].saturating_sub(1);
            st.bytes[c as usize] = st.bytes[c as usize].saturating_sub(v.len() as u64);
        }
        Ok(())
    }

    /// CHeKT rejected the event permanently: move it to the dead-letter store.
    pub fn dead_letter(&self, key: &QueueKey, dl: &DeadLetter) -> Result<(), SpoolError> {
        let len = self
            .db
            .get(&key.0)
            .map_err(store_err(&self.dir))?
            .map(|v| v.len() as u64)
            .unwrap_or(0);
        self.move_to_dead(key, len, dl)
    }

    fn move_to_dead(&self, key: &QueueKey, len: u64, dl: &DeadLetter) -> Result<(), SpoolError> {
        let mut b = sled::Batch::default();
        b.remove(key.0.clone());
        let mut k = vec![b'd'];
        k.extend_from_slice(&self.next_msg_id().to_be_bytes());
        b.insert(k, encode(dl)?);
        self.db.apply_batch(b).map_err(store_err(&self.dir))?;
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
        self.db
            .scan_prefix(b"d")
            .map(|r| {
                r.map(|(_, v)| decode::<DeadLetter>(&v))
                    .map_err(store_err(&self.dir))
            })
            .collect()
    }

    /// Queued events in delivery order (for `spool list` and tests).
    pub fn queued(&self, limit: usize) -> Result<Vec<Result<Event, String>>, SpoolError> {
        self.db
            .scan_prefix(b"q")
            .take(limit)
            .map(|r| {
                r.map(|(_, v)| decode::<Event>(&v))
                    .map_err(store_err(&self.dir))
            })
            .collect()
    }

    pub fn stats(&self) -> Stats {
        let st = self.state();
        Stats {
            queued: st.queued,
            live_bytes: st.live_bytes(),
            dropped: st.dropped,
            dead_letters: st.dead,
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

fn dir_size(p: &Path) -> u64 {
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
            let (s, reset) = Spool::open(&c).unwrap();
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
        let (s, _) = Spool::open(&c).unwrap();
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
        let (s, _) = Spool::open(&c).unwrap();
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
        let (s, _) = Spool::open(&c).unwrap();
        assert_eq!(s.stats().dropped, st.dropped, "drop counters persist");
    }

    #[test]
    fn corrupt_store_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), 1 << 20);
        {
            let (s, _) = Spool::open(&c).unwrap();
            put(&s, &[ev(Class::Alarm, 1)]);
        }
        std::fs::write(c.dir.join("conf"), b"garbage that is not a sled config").unwrap();
        std::fs::write(c.dir.join("db"), vec![0xAB; 4096]).unwrap();
        let (s, reset) = Spool::open(&c).unwrap();
        let reset = reset.expect("store was reset");
        assert!(reset.moved_to.exists());
        assert_eq!(s.stats().backlog(), 0);
    }
}
