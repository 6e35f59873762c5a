//! Torture suite: the agent under SIGKILLs, CHeKT faults, a full disk, a damaged store, a
//! wrong clock and malformed input. Every case prints one `TORTURE` line with its figures
//! (events sent, delivered, lost, duplicate effects = events that reached CHeKT under more
//! than one `Idempotency-Key`, drops) and fails on any loss. See RELIABILITY.md.
//!
//! Scale: the short form runs by default (`cargo test`, `.ci/run`); the full form with
//!
//!     CHEKT_TORTURE=full cargo test --release --test torture -- --nocapture --test-threads=1
//!
//! `CHEKT_TORTURE_SEED=<n>` replays a run's random choices (each case prints its seed);
//! `CHEKT_TORTURE_FIGURES=<file>` also appends the figure lines to that file.
//!
//! Real parts throughout: mosquitto with persistence (the case fails in CI without it), the
//! real `chekt-agent` binary where the process matters, a real sled store on disk (on a
//! size-limited tmpfs for the disk-full case: needs root, skipped with a reason outside CI),
//! real TLS to the CHeKT simulator.

#[allow(dead_code)]
#[path = "it/support.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chekt_agent::clock::Clock;
use chekt_agent::pipeline::Running;
use chekt_agent::simulator::{Faults, SimConfig, Simulator};
use chekt_agent::testbed::{AgentKnobs, Testbed};

use support::{Mosquitto, json_event, publish_all};

// ---------------------------------------------------------------------------------------
// Scale, randomness, figures

/// `RUST_LOG=...` shows the in-process agent's logs (the binary logs to agent.log).
fn init_log() {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
}

fn full() -> bool {
    std::env::var("CHEKT_TORTURE").is_ok_and(|v| v == "full")
}

/// `short` in the default form, `full` with `CHEKT_TORTURE=full`.
fn scale(short: usize, full_form: usize) -> usize {
    if full() { full_form } else { short }
}

fn form() -> &'static str {
    if full() { "full" } else { "short" }
}

/// xorshift64, seeded from `CHEKT_TORTURE_SEED` or the clock.
struct Seeded(u64);

impl Seeded {
    fn new(case: &str) -> Seeded {
        let seed = std::env::var("CHEKT_TORTURE_SEED")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        record(&format!(
            "TORTURE {case}: seed {seed} (CHEKT_TORTURE_SEED={seed} replays it)"
        ));
        Seeded(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// [`say`], and append to `CHEKT_TORTURE_FIGURES` when set.
fn record(line: &str) {
    say(line);
    if let Ok(path) = std::env::var("CHEKT_TORTURE_FIGURES")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// Straight to the process's stderr: libtest's capture only sees `eprintln!`, and the
/// figures must show in CI logs whether the case passes or fails.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

#[derive(Debug, Default)]
struct Figures {
    case: &'static str,
    sent: u64,
    delivered: u64,
    lost: u64,
    dup_effects: u64,
    drops: u64,
    /// Events in a store that was set aside (kept on disk, not delivered).
    set_aside: u64,
    /// For the fuzz case: executions instead of events.
    executions: Option<u64>,
    notes: String,
}

impl Figures {
    fn print(&self, started: Instant) {
        let figures = match self.executions {
            Some(n) => format!("executions {n}, panics 0"),
            None => format!(
                "sent {}, delivered {}, lost {}, duplicate effects {}, drops {}{}",
                self.sent,
                self.delivered,
                self.lost,
                self.dup_effects,
                self.drops,
                if self.set_aside > 0 {
                    format!(", set aside {}", self.set_aside)
                } else {
                    String::new()
                }
            ),
        };
        let line = format!(
            "TORTURE {} [{}]: {figures}; {} ({:.1} s)",
            self.case,
            form(),
            self.notes,
            started.elapsed().as_secs_f64()
        );
        record(&line);
    }

    fn assert_clean(&self) {
        assert_eq!(self.lost, 0, "{}: events lost: {self:?}", self.case);
        assert_eq!(
            self.dup_effects, 0,
            "{}: events reached CHeKT under more than one Idempotency-Key: {self:?}",
            self.case
        );
    }
}

/// What CHeKT holds for a set of sent descriptions.
#[derive(Debug, Default)]
struct Tally {
    /// Sent descriptions present at CHeKT.
    delivered: u64,
    /// Sent descriptions present under more than one Idempotency-Key.
    dup_effects: u64,
    /// Idempotent replays CHeKT answered (the same key again: no duplicate effect).
    replays: u64,
    /// 409 answers (a key reused with another body: would be an agent bug).
    conflicts: u64,
    /// Examples of what is missing.
    missing: Vec<String>,
}

fn desc(r: &chekt_agent::simulator::Received) -> String {
    r.body["description"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn tally(sim: &Simulator, sent: &HashSet<String>) -> Tally {
    let mut keys: HashMap<String, HashSet<String>> = HashMap::new();
    let mut t = Tally::default();
    for r in sim.received() {
        let d = desc(&r);
        if sent.contains(&d) {
            keys.entry(d).or_default().insert(r.idempotency_key.clone());
        }
    }
    let st = sim.stats();
    t.replays = st.events_replayed;
    t.conflicts = st.conflicts_409;
    t.delivered = keys.len() as u64;
    t.dup_effects = keys.values().filter(|k| k.len() > 1).count() as u64;
    let mut missing: Vec<&String> = sent.iter().filter(|d| !keys.contains_key(*d)).collect();
    missing.sort();
    t.missing = missing.into_iter().take(10).cloned().collect();
    t
}

/// Wait until every sent description is at CHeKT (or `limit` passes); then the tally.
async fn wait_delivered(sim: &Simulator, sent: &HashSet<String>, limit: Duration) -> Tally {
    let start = Instant::now();
    loop {
        let t = tally(sim, sent);
        if t.delivered as usize >= sent.len() || start.elapsed() > limit {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Mixed traffic on the JSON rule: every `alarm_every`-th an alarm, then troubles, arming
/// and routine events. Descriptions are unique: `<tag>-<i>`.
fn mixed(tag: &str, range: std::ops::Range<usize>, alarm_every: usize) -> Vec<(String, Vec<u8>)> {
    range
        .map(|i| {
            let d = format!("{tag}-{i}");
            let body = if i % alarm_every == 0 {
                json_event("alarm", "active", Some(4), &d, false)
            } else if i % 7 == 1 {
                json_event("trouble", "active", None, &d, false)
            } else if i % 7 == 2 {
                json_event("arming", "armed", None, &d, false)
            } else {
                json_event("alarm", "active", Some(5), &d, true)
            };
            ("site/panel1/events".to_string(), body)
        })
        .collect()
}

fn descriptions(msgs: &[(String, Vec<u8>)]) -> HashSet<String> {
    msgs.iter()
        .map(|(_, p)| {
            serde_json::from_slice::<serde_json::Value>(p).unwrap()["description"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn is_alarm(msg: &(String, Vec<u8>)) -> bool {
    let v: serde_json::Value = serde_json::from_slice(&msg.1).unwrap();
    v["type"] == "alarm" && v.get("priority").is_none()
}

fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The agent binary, killed (SIGKILL) when dropped: a failing case leaves no process behind.
struct Agent(Child);

impl Agent {
    fn spawn(config: &Path, log: &Path) -> Agent {
        Agent(support::spawn_agent(config, log))
    }

    fn sigkill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl std::ops::Deref for Agent {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sim_cfg() -> SimConfig {
    SimConfig {
        rate_limit: None,
        ..SimConfig::default()
    }
}

/// Replace `from` (which must occur) in the testbed's agent.toml.
fn edit_config(tb: &Testbed, from: &str, to: &str) {
    let text = std::fs::read_to_string(&tb.config_path).unwrap();
    assert!(text.contains(from), "agent.toml has no {from:?}:\n{text}");
    std::fs::write(&tb.config_path, text.replacen(from, to, 1)).unwrap();
}

/// The pipeline in process, connected to the broker.
async fn start_in_process(tb: &Testbed, clock: Option<Arc<Clock>>) -> Running {
    init_log();
    support::start_subscribed(tb, clock, Duration::from_secs(20)).await
}

/// mosquitto with persistence on a free port; `None` (case skipped) only outside CI.
fn mosquitto(case: &str) -> Option<Mosquitto> {
    let m = Mosquitto::start();
    if m.is_none() {
        say(&format!(
            "TORTURE {case}: SKIPPED: mosquitto is not installed"
        ));
    }
    m
}

// ---------------------------------------------------------------------------------------
// 1. SIGKILL of the real binary while QoS-1 events stream through mosquitto

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t1_sigkill_while_streaming() {
    let case = "1-sigkill";
    let Some(m) = mosquitto(case) else { return };
    let started = Instant::now();
    let events = scale(2_000, 20_000);
    let kills = scale(10, 100);
    let mut rng = Seeded::new(case);
    let tb = Testbed::start(sim_cfg(), Some(m.port), AgentKnobs::default())
        .await
        .unwrap();
    let log = tb.path("agent.log");
    // The first run registers the persistent session before anything is published.
    let mut child = Agent(support::spawn_agent_subscribed(&tb.config_path, &log).await);
    let msgs = mixed("k", 0..events, 3);
    let sent = descriptions(&msgs);
    // Stream for about as long as the kills take (mean gap ~0.5 s incl. restart).
    let stream_for = Duration::from_millis(kills as u64 * 450);
    let port = m.port;
    let publisher = tokio::spawn(async move {
        let chunks: Vec<_> = msgs.chunks(50).map(|c| c.to_vec()).collect();
        let gap = stream_for / chunks.len().max(1) as u32;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let t = Instant::now();
            publish_all(port, &format!("kill-pub-{i}"), chunk).await;
            if let Some(rest) = gap.checked_sub(t.elapsed()) {
                tokio::time::sleep(rest).await;
            }
        }
    });
    let mut early = 0;
    for _ in 0..kills {
        // Random moments, a quarter of them right after start (spool open, recovery).
        let ms = if rng.below(4) == 0 {
            early += 1;
            rng.below(150)
        } else {
            150 + rng.below(600)
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        child.sigkill();
        child = Agent::spawn(&tb.config_path, &log);
    }
    publisher.await.unwrap();
    let kills_done_at = started.elapsed();
    let t = wait_delivered(&tb.sim, &sent, Duration::from_secs(scale(180, 900) as u64)).await;
    let alive = child.try_wait().unwrap().is_none();
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(15));
    let figs = Figures {
        case,
        sent: sent.len() as u64,
        delivered: t.delivered,
        lost: sent.len() as u64 - t.delivered,
        dup_effects: t.dup_effects,
        drops: 0,
        notes: format!(
            "{kills} SIGKILLs ({early} within 150 ms of start), streaming done at {:.1} s, {} same-key replays answered by CHeKT, 409s {}, missing e.g. {:?}",
            kills_done_at.as_secs_f64(),
            t.replays,
            t.conflicts,
            t.missing
        ),
        ..Figures::default()
    };
    figs.print(started);
    if figs.lost > 0 {
        say(&format!("agent log tail:\n{}", log_tail(&log, 40)));
    }
    figs.assert_clean();
    assert_eq!(t.conflicts, 0, "idempotency conflicts");
    assert!(alive, "the agent died by itself:\n{}", log_tail(&log, 40));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "clean exit on SIGTERM"
    );
}

// ---------------------------------------------------------------------------------------
// 2. CHeKT faults, all at once, and a full outage in the middle

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t2_simulator_faults_and_outage() {
    let case = "2-faults";
    let Some(m) = mosquitto(case) else { return };
    let started = Instant::now();
    let events = scale(600, 6_000);
    let tb = Testbed::start(
        sim_cfg(),
        Some(m.port),
        AgentKnobs {
            backoff_base_ms: 10,
            backoff_max_secs: 1,
            ..AgentKnobs::default()
        },
    )
    .await
    .unwrap();
    // Stalls (2 s) outlast the agent's request timeout (1 s).
    edit_config(&tb, "request_timeout_secs = 5", "request_timeout_secs = 1");
    let running = start_in_process(&tb, None).await;
    let mixed_faults = Faults {
        error_rates: vec![(500, 0.10), (502, 0.10), (503, 0.10)],
        reset_rate: 0.05,
        stall_rate: 0.01,
        stall: Duration::from_secs(2),
        lost_response_rate: 0.05,
        ..Faults::default()
    };
    tb.sim.set_faults(mixed_faults.clone());
    let msgs = mixed("f", 0..events, 5);
    let sent = descriptions(&msgs);
    let port = m.port;
    let publisher = tokio::spawn(async move {
        for (i, chunk) in msgs.chunks(100).enumerate() {
            publish_all(port, &format!("faults-pub-{i}"), chunk.to_vec()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let delivered = || tally(&tb.sim, &sent).delivered as usize;
    let phase_limit = Duration::from_secs(scale(120, 900) as u64);
    // Phase 1: mixed faults until a quarter is through; then a 429 storm.
    support::wait_for(phase_limit, "a quarter delivered", || {
        delivered() >= events / 4
    })
    .await;
    tb.sim.set_faults(Faults {
        rate_limit_storm: Some(1),
        ..mixed_faults.clone()
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    tb.sim.set_faults(mixed_faults.clone());
    // Phase 2: half through; then a full outage (connections refused and reset).
    support::wait_for(phase_limit, "half delivered", || delivered() >= events / 2).await;
    tb.sim.set_outage(true);
    let at_outage = delivered();
    tokio::time::sleep(Duration::from_secs(scale(5, 20) as u64)).await;
    let during_outage = delivered() - at_outage;
    tb.sim.set_outage(false);
    // Phase 3: three quarters; a second storm with a longer Retry-After.
    support::wait_for(phase_limit, "three quarters delivered", || {
        delivered() >= events * 3 / 4
    })
    .await;
    tb.sim.set_faults(Faults {
        rate_limit_storm: Some(2),
        ..mixed_faults.clone()
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    tb.sim.set_faults(mixed_faults.clone());
    publisher.await.unwrap();
    let t = wait_delivered(&tb.sim, &sent, phase_limit).await;
    let st = tb.sim.stats();
    let retries = running.upload.retries.load(Ordering::Relaxed);
    let figs = Figures {
        case,
        sent: sent.len() as u64,
        delivered: t.delivered,
        lost: sent.len() as u64 - t.delivered,
        dup_effects: t.dup_effects,
        drops: running.spool.stats().dropped.iter().sum(),
        notes: format!(
            "faults injected {} (resets {}, stalls {}, 429s {}, lost responses {}), agent retries {retries}, {} same-key replays answered by CHeKT, 409s {}, {during_outage} delivered during the outage, dead letters {}, missing e.g. {:?}",
            st.injected_faults,
            st.resets,
            st.stalls,
            st.rate_limited_429,
            st.lost_responses,
            t.replays,
            t.conflicts,
            running.spool.stats().dead_letters,
            t.missing
        ),
        ..Figures::default()
    };
    figs.print(started);
    figs.assert_clean();
    assert_eq!(t.conflicts, 0, "idempotency conflicts");
    assert_eq!(during_outage, 0, "nothing accepted while CHeKT was down");
    assert_eq!(running.spool.stats().dead_letters, 0, "nothing rejected");
    assert!(running.task_died().is_none());
    running.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Disk full: the agent's state on a small tmpfs of its own

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` (case skipped) when mounting is impossible here and we are not in CI.
    fn mount(dir: &Path, size: &str, case: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir.to_path_buf())),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "{case}: cannot mount a tmpfs (CI must run as root): {why}"
                );
                say(&format!(
                    "TORTURE {case}: SKIPPED: cannot mount a size-limited tmpfs here (needs root): {why}"
                ));
                None
            }
        }
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {} to {size}", self.0.display());
    }

    fn used_kib(&self) -> u64 {
        let out = Command::new("df")
            .args(["-k", "--output=used"])
            .arg(&self.0)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// The testbed's state (spool) on a tmpfs of `size`; keys stay where the testbed put them.
fn state_on_tmpfs(tb: &Testbed, size: &str, case: &str) -> Option<Tmpfs> {
    let fs = Tmpfs::mount(&tb.path("small"), size, case)?;
    edit_config(tb, "state_dir = \"state\"", "state_dir = \"small/state\"");
    edit_config(
        tb,
        "auth = \"assertion\"",
        "auth = \"assertion\"\nkey_dir = \"state/keys\"",
    );
    Some(fs)
}

/// Stream mixed traffic (1 in 10 an alarm) until the store fails for lack of space.
async fn fill_until_enospc(
    running: &Running,
    port: u16,
    tag: &str,
    msgs: &mut Vec<(String, Vec<u8>)>,
    fs: &Tmpfs,
) {
    let spool = &running.spool;
    let max = 60_000;
    while spool.stats().store_failures == 0 {
        assert!(
            msgs.len() < max,
            "{max} events did not fill the store: {:?}, {} KiB used",
            spool.stats(),
            fs.used_kib()
        );
        let next = mixed(tag, msgs.len()..msgs.len() + 250, 10);
        publish_all(port, &format!("{tag}-pub"), next.clone()).await;
        msgs.extend(next);
        // Give the committer a moment, so the failure is seen close to where it happened.
        let commits = running.ingest.commits.load(Ordering::Relaxed);
        let t = Instant::now();
        while running.ingest.commits.load(Ordering::Relaxed) == commits
            && spool.stats().store_failures == 0
            && t.elapsed() < Duration::from_secs(2)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn set_aside_dirs(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains("spool.corrupt-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3a_disk_full_enospc() {
    let case = "3a-disk-full";
    let Some(m) = mosquitto(case) else { return };
    let started = Instant::now();
    // The byte budget (64 MiB) is far above the filesystem (4 MiB): sled meets ENOSPC.
    let tb = Testbed::start(sim_cfg(), Some(m.port), AgentKnobs::default())
        .await
        .unwrap();
    let Some(fs) = state_on_tmpfs(&tb, "4m", case) else {
        return;
    };
    let running = start_in_process(&tb, None).await;
    tb.sim.set_outage(true);
    let spool = running.spool.clone();
    let mut msgs: Vec<(String, Vec<u8>)> = Vec::new();
    fill_until_enospc(&running, m.port, "df", &mut msgs, &fs).await;
    let spooled_at_full = spool.stats().backlog();
    let sent_at_full = msgs.len();
    // Keep streaming while full: alarms among routine traffic, all acknowledged only by the
    // broker (the agent cannot make them durable, so it must not acknowledge them).
    let hold = Duration::from_secs(scale(8, 60) as u64);
    let t = Instant::now();
    let mut checks = 0;
    let mut unavailable_seen = false;
    while t.elapsed() < hold {
        let next = mixed("df", msgs.len()..msgs.len() + 100, 4);
        publish_all(m.port, "df-pub", next.clone()).await;
        msgs.extend(next);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            running.task_died().is_none(),
            "a loop ended while the disk was full"
        );
        let stalled = running.stalled(Duration::from_secs(5));
        assert!(
            stalled.is_empty(),
            "loops not turning while full: {stalled:?}"
        );
        assert!(running.ingest.connected.load(Ordering::Relaxed));
        unavailable_seen |= spool.stats().unavailable;
        checks += 1;
    }
    let failures_while_full = spool.stats().store_failures;
    let used_full = fs.used_kib();
    // Space returns; CHeKT returns.
    fs.resize("64m");
    tb.sim.set_outage(false);
    let sent = descriptions(&msgs);
    let alarms: HashSet<String> = descriptions(
        &msgs
            .iter()
            .filter(|m| is_alarm(m))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let t = wait_delivered(&tb.sim, &sent, Duration::from_secs(scale(180, 600) as u64)).await;
    let ta = tally(&tb.sim, &alarms);
    let st = spool.stats();
    let drops: u64 = st.dropped.iter().sum();
    let figs = Figures {
        case,
        sent: sent.len() as u64,
        delivered: t.delivered,
        lost: sent.len() as u64 - t.delivered - drops,
        dup_effects: t.dup_effects,
        drops,
        notes: format!(
            "4 MiB tmpfs full after {sent_at_full} sent / {spooled_at_full} spooled ({used_full} KiB used); held full {:.0} s with {checks} liveness checks (no loop died or stalled); store failures {failures_while_full} (closed+reopened: {unavailable_seen}); alarms {}/{} delivered; {} same-key replays answered by CHeKT; loop ended: {:?}; missing e.g. {:?}",
            hold.as_secs_f64(),
            ta.delivered,
            alarms.len(),
            t.replays,
            running.task_died(),
            t.missing
        ),
        ..Figures::default()
    };
    figs.print(started);
    let died = running.task_died();
    figs.assert_clean();
    assert_eq!(ta.delivered as usize, alarms.len(), "every alarm delivered");
    assert!(died.is_none(), "loop ended: {died:?}");
    running.stop().await;
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3c_restart_while_disk_full() {
    let case = "3c-restart-while-full";
    let Some(m) = mosquitto(case) else { return };
    let started = Instant::now();
    let tb = Testbed::start(sim_cfg(), Some(m.port), AgentKnobs::default())
        .await
        .unwrap();
    let Some(fs) = state_on_tmpfs(&tb, "2m", case) else {
        return;
    };
    let log = tb.path("agent.log");
    tb.sim.set_outage(true);
    let running = start_in_process(&tb, None).await;
    let mut msgs: Vec<(String, Vec<u8>)> = Vec::new();
    fill_until_enospc(&running, m.port, "rf", &mut msgs, &fs).await;
    let spooled = running.spool.stats().backlog();
    let report = running.stop().await;
    // More traffic while the agent is down and the disk is full.
    let more = mixed("rf", msgs.len()..msgs.len() + 200, 4);
    publish_all(m.port, "rf-pub-down", more.clone()).await;
    msgs.extend(more);
    // Starting while the disk is full: refused (EX_IOERR), the store stays where it is.
    let state = tb.path("small/state");
    let (status_code, _, status_err) = support::agent(&[
        "spool",
        "status",
        "--config",
        tb.config_path.to_str().unwrap(),
    ]);
    let mut child = Agent::spawn(&tb.config_path, &log);
    let run_code = wait_exit(&mut child, Duration::from_secs(30)).and_then(|s| s.code());
    let aside_while_full = set_aside_dirs(&state);
    // Space returns: the real binary starts and delivers everything.
    fs.resize("64m");
    tb.sim.set_outage(false);
    let mut child = Agent::spawn(&tb.config_path, &log);
    let sent = descriptions(&msgs);
    let t = wait_delivered(&tb.sim, &sent, Duration::from_secs(scale(120, 600) as u64)).await;
    let alive = child.try_wait().unwrap().is_none();
    sigterm(&child);
    let _ = wait_exit(&mut child, Duration::from_secs(15));
    let aside = set_aside_dirs(&state);
    let figs = Figures {
        case,
        sent: sent.len() as u64,
        delivered: t.delivered,
        lost: sent.len() as u64 - t.delivered,
        dup_effects: t.dup_effects,
        notes: format!(
            "2 MiB tmpfs full with {spooled} spooled; pipeline stopped (not stopped in time: {:?}); while full `spool status` exit {status_code} and `run` exit {run_code:?} (74 = EX_IOERR, store left in place; set-aside dirs {}); after space returned the binary delivered everything (up: {alive}); set-aside dirs at the end {}; {} same-key replays answered by CHeKT",
            report.not_stopped,
            aside_while_full.len(),
            aside.len(),
            t.replays
        ),
        ..Figures::default()
    };
    figs.print(started);
    if figs.lost > 0 {
        say(&format!("agent log tail:\n{}", log_tail(&log, 30)));
    }
    figs.assert_clean();
    assert_eq!(status_code, 74, "spool status on a full disk: {status_err}");
    assert_eq!(
        run_code,
        Some(74),
        "run on a full disk:\n{}",
        log_tail(&log, 20)
    );
    assert!(aside.is_empty(), "a full disk is not corruption: {aside:?}");
    assert!(
        report.not_stopped.is_empty(),
        "the pipeline stops although its store is failing: {:?}",
        report.not_stopped
    );
    assert!(alive, "agent up after space returned");
    drop(fs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t3b_disk_budget_keeps_alarms() {
    let case = "3b-budget";
    let Some(m) = mosquitto(case) else { return };
    let started = Instant::now();
    // Small enough for the budget to bite, large enough for every alarm and trouble.
    let budget = scale(192, 1_536) as u64 * 1024;
    let tb = Testbed::start(
        sim_cfg(),
        Some(m.port),
        AgentKnobs {
            spool_max_bytes: budget,
            ..AgentKnobs::default()
        },
    )
    .await
    .unwrap();
    // Room for sled's files, which grow far beyond the live bytes (see RELIABILITY.md).
    let fs_size = if full() { "256m" } else { "64m" };
    let Some(fs) = state_on_tmpfs(&tb, fs_size, case) else {
        return;
    };
    let running = start_in_process(&tb, None).await;
    tb.sim.set_outage(true);
    let events = scale(4_000, 30_000);
    let msgs = mixed("bg", 0..events, 10);
    let alarms: HashSet<String> = descriptions(
        &msgs
            .iter()
            .filter(|m| is_alarm(m))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let sent = descriptions(&msgs);
    for (i, c) in msgs.chunks(500).enumerate() {
        publish_all(m.port, &format!("bg-pub-{i}"), c.to_vec()).await;
    }
    let ingest = running.ingest.clone();
    let spool = running.spool.clone();
    support::wait_for(
        Duration::from_secs(scale(120, 600) as u64),
        "everything committed",
        || {
            ingest.spooled_events.load(Ordering::Relaxed) >= events as u64
                || spool.stats().store_failures > 0
        },
    )
    .await;
    let at_peak = spool.stats();
    let used = fs.used_kib();
    tb.sim.set_outage(false);
    // Everything not dropped by policy arrives; drops are counted and reported.
    let limit = Duration::from_secs(scale(180, 900) as u64);
    let start_wait = Instant::now();
    let mut t;
    loop {
        t = tally(&tb.sim, &sent);
        let dropped: u64 = spool.stats().dropped.iter().sum();
        let reported = tb
            .sim
            .received()
            .iter()
            .any(|r| r.body["code"] == "AGENT:spool_overflow");
        if (t.delivered + dropped >= events as u64 && reported) || start_wait.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = spool.stats();
    let drops: u64 = st.dropped.iter().sum();
    let ta = tally(&tb.sim, &alarms);
    let overflow_reports = tb
        .sim
        .received()
        .iter()
        .filter(|r| r.body["code"] == "AGENT:spool_overflow")
        .count();
    let figs = Figures {
        case,
        sent: events as u64,
        delivered: t.delivered,
        lost: (events as u64).saturating_sub(t.delivered + drops),
        dup_effects: t.dup_effects,
        drops,
        notes: format!(
            "budget {} KiB on a {fs_size} tmpfs ({used} KiB used at peak: sled's files vs live event bytes); dropped per class [alarm, trouble, arming, routine] = {:?}; alarms {}/{} delivered; {overflow_reports} spool_overflow trouble event(s) at CHeKT; store failures {}; backlog at peak {} ({} live bytes)",
            budget / 1024,
            st.dropped,
            ta.delivered,
            alarms.len(),
            st.store_failures,
            at_peak.backlog(),
            at_peak.live_bytes,
        ),
        ..Figures::default()
    };
    figs.print(started);
    figs.assert_clean();
    assert_eq!(st.dropped[0], 0, "no alarm dropped");
    assert_eq!(ta.delivered as usize, alarms.len(), "every alarm delivered");
    assert!(st.dropped[3] > 0, "the budget was exercised: {st:?}");
    assert!(overflow_reports > 0, "spool_overflow reported to CHeKT");
    assert!(running.task_died().is_none());
    running.stop().await;
    drop(fs);
}

// ---------------------------------------------------------------------------------------
// 4. Store files damaged between runs

#[derive(Clone, Copy, Debug)]
enum Damage {
    TruncateDbHalf,
    GarbageInDb,
    DeleteConf,
    TruncateDbZero,
    GarbageOverDbStart,
    DeleteSnapshots,
}

fn damage(spool: &Path, how: Damage, rng: &mut Seeded) -> String {
    let db = spool.join("db");
    let len = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    match how {
        Damage::TruncateDbHalf => {
            let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
            f.set_len(len / 2).unwrap();
            format!("db truncated {len} -> {} bytes", len / 2)
        }
        Damage::TruncateDbZero => {
            let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
            f.set_len(0).unwrap();
            format!("db truncated {len} -> 0 bytes")
        }
        Damage::GarbageInDb | Damage::GarbageOverDbStart => {
            use std::io::{Seek, SeekFrom};
            let at = match how {
                Damage::GarbageInDb => len / 3 + rng.below(len / 3 + 1),
                _ => 0,
            };
            let n = 4096.min(len.saturating_sub(at)) as usize;
            let garbage: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&garbage).unwrap();
            format!("{n} garbage bytes at offset {at} of {len}")
        }
        Damage::DeleteConf => {
            std::fs::remove_file(spool.join("conf")).unwrap();
            "conf deleted".into()
        }
        Damage::DeleteSnapshots => {
            let mut n = 0;
            for e in std::fs::read_dir(spool).unwrap().flatten() {
                if e.file_name().to_string_lossy().starts_with("snap.") {
                    std::fs::remove_file(e.path()).unwrap();
                    n += 1;
                }
            }
            format!("{n} snapshot file(s) deleted")
        }
    }
}

fn spool_status(config: &Path) -> serde_json::Value {
    let (code, out, err) =
        support::agent(&["spool", "status", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "spool status: {err}");
    serde_json::from_str(out.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t4_damaged_store_between_runs() {
    let case = "4-damaged-store";
    let mut rng = Seeded::new(case);
    let mut variants = vec![
        Damage::TruncateDbHalf,
        Damage::GarbageInDb,
        Damage::DeleteConf,
    ];
    if full() {
        variants.extend([
            Damage::TruncateDbZero,
            Damage::GarbageOverDbStart,
            Damage::DeleteSnapshots,
        ]);
    }
    let mut failures = Vec::new();
    for (vi, how) in variants.into_iter().enumerate() {
        let Some(m) = mosquitto(case) else { return };
        let started = Instant::now();
        let old_n = scale(300, 3_000);
        let new_n = scale(100, 1_000);
        let tb = Testbed::start(sim_cfg(), Some(m.port), AgentKnobs::default())
            .await
            .unwrap();
        let log = tb.path("agent.log");
        // Run 1: CHeKT down, events spooled; then SIGKILL.
        tb.sim.set_outage(true);
        let mut child = Agent(support::spawn_agent_subscribed(&tb.config_path, &log).await);
        let old = mixed(&format!("old{vi}"), 0..old_n, 5);
        publish_all(m.port, "dmg-pub-old", old.clone()).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        child.sigkill();
        let before = spool_status(&tb.config_path);
        let in_store = before["backlog"].as_u64().unwrap();
        let spool_dir = chekt_agent::testbed::spool_dir(&tb.dir);
        let what = damage(&spool_dir, how, &mut rng);
        // Run 2: CHeKT up; the agent must start, stay up and take new events.
        tb.sim.set_outage(false);
        let mut child = Agent::spawn(&tb.config_path, &log);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let new = mixed(&format!("new{vi}"), 0..new_n, 5);
        publish_all(m.port, "dmg-pub-new", new.clone()).await;
        let new_sent = descriptions(&new);
        let tn = wait_delivered(&tb.sim, &new_sent, Duration::from_secs(60)).await;
        let old_sent = descriptions(&old);
        // Old events not in the store at the kill were still with the broker: they arrive.
        let to = wait_delivered(&tb.sim, &old_sent, Duration::from_secs(5)).await;
        // `spool status` while the agent runs must be refused, not set the live store aside.
        let (code, _, err) = support::agent(&[
            "spool",
            "status",
            "--config",
            tb.config_path.to_str().unwrap(),
        ]);
        let status_refused = code != 0 && err.contains("lock");
        let alive = child.try_wait().unwrap().is_none();
        let reset_reported = tb
            .sim
            .received()
            .iter()
            .any(|r| r.body["code"] == "AGENT:spool_reset");
        let set_aside: Vec<PathBuf> = std::fs::read_dir(tb.path("state"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("spool.corrupt-"))
            .collect();
        sigterm(&child);
        let _ = wait_exit(&mut child, Duration::from_secs(15));
        let old_missing = old_sent.len() as u64 - to.delivered;
        // Missing old events are accounted for only if their store was set aside.
        let in_set_aside = if set_aside.is_empty() { 0 } else { old_missing };
        let silently_lost = old_missing - in_set_aside;
        let figs = Figures {
            case,
            sent: (old_sent.len() + new_sent.len()) as u64,
            delivered: to.delivered + tn.delivered,
            lost: silently_lost + (new_sent.len() as u64 - tn.delivered),
            dup_effects: to.dup_effects + tn.dup_effects,
            drops: 0,
            set_aside: in_set_aside,
            executions: None,
            notes: format!(
                "{how:?} ({what}): {in_store} of {old_n} old events were in the store; after restart {} old delivered, {in_set_aside} in the set-aside store {:?} (not delivered, not lost: kept on disk), {silently_lost} silently lost; store reset {} (spool_reset at CHeKT: {reset_reported}); {}/{new_n} new events delivered; agent up: {alive}; `spool status` while running refused: {status_refused}",
                to.delivered,
                set_aside
                    .iter()
                    .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                    .collect::<Vec<_>>(),
                if set_aside.is_empty() {
                    "no (sled recovered)"
                } else {
                    "yes"
                },
                tn.delivered,
            ),
        };
        figs.print(started);
        if figs.lost > 0 || !alive {
            say(&format!("agent log tail:\n{}", log_tail(&log, 30)));
            failures.push(format!("{how:?}: {figs:?} alive={alive}"));
        }
        if !set_aside.is_empty() && !reset_reported {
            failures.push(format!(
                "{how:?}: store set aside but no spool_reset at CHeKT"
            ));
        }
        if !status_refused || set_aside.len() > 1 {
            failures.push(format!(
                "{how:?}: `spool status` while running: exit {code}, {err}; set-aside dirs {set_aside:?}"
            ));
        }
        if figs.dup_effects > 0 {
            failures.push(format!("{how:?}: duplicate effects {}", figs.dup_effects));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------------------
// 5. The agent's clock at 1970, a day ahead, a day behind

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t5_wrong_clock() {
    let case = "5-clock";
    let now = Clock::system().local_ms();
    let skews = [
        ("1970-01-02", -(now - 86_400_000)),
        ("+1 day", 86_400_000),
        ("-1 day", -86_400_000),
    ];
    let n = scale(30, 300);
    for (label, skew) in skews {
        let Some(m) = mosquitto(case) else { return };
        let started = Instant::now();
        let tb = Testbed::start(sim_cfg(), Some(m.port), AgentKnobs::default())
            .await
            .unwrap();
        let clock = Arc::new(Clock::skewed(skew));
        let running = start_in_process(&tb, Some(clock.clone())).await;
        let tag = format!("clk{}", label.replace([' ', '+', '-'], ""));
        let mut msgs = mixed(&tag, 0..n, 3);
        // And the other decoders: they carry no description of ours, counted apart.
        let others = vec![
            (
                "site/panel/panel1/cid".to_string(),
                b"1234 18 1130 01 009".to_vec(),
            ),
            ("site/panel/panel1/sia".to_string(), b"Nri1/BA004".to_vec()),
        ];
        let sent = descriptions(&msgs);
        msgs.extend(others.clone());
        publish_all(m.port, "clock-pub", msgs).await;
        let t = wait_delivered(&tb.sim, &sent, Duration::from_secs(60)).await;
        let limit = Instant::now() + Duration::from_secs(20);
        while tb.sim.received().len() < sent.len() + others.len() && Instant::now() < limit {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = tb.sim.received();
        let true_now = Clock::system().local_ms();
        let stamps: Vec<i64> = got
            .iter()
            .filter_map(|r| r.body["received_at"].as_i64())
            .collect();
        let skews_s: Vec<i64> = stamps.iter().map(|t| (t - true_now).abs() / 1000).collect();
        let worst_skew_s = skews_s.iter().copied().max().unwrap_or(0);
        // received_at is stamped at ingest, before the first request to CHeKT taught the
        // clock anything: such events carry the wrong clock's time (a finding, not a loss),
        // except that a time before 2026 is left out of the body, never sent.
        let off_by_more_than_a_minute = skews_s.iter().filter(|s| **s > 60).count();
        let left_out = got.len() - skews_s.len();
        let before_2026: Vec<i64> = stamps
            .iter()
            .copied()
            .filter(|t| *t < chekt_agent::clock::MIN_PLAUSIBLE * 1000)
            .collect();
        let figs = Figures {
            case,
            sent: (sent.len() + others.len()) as u64,
            delivered: got.len() as u64,
            lost: (sent.len() + others.len()) as u64
                - (got.len() as u64).min((sent.len() + others.len()) as u64),
            dup_effects: t.dup_effects,
            drops: 0,
            notes: format!(
                "local clock {label}: offset learned {} ({} s), tokens issued {}, {off_by_more_than_a_minute} of {} events with received_at off by > 60 s (worst {worst_skew_s} s), {left_out} without received_at (stamped before 2026), dead letters {}",
                clock.has_learned(),
                clock.offset_ms() / 1000,
                tb.sim.stats().token_ok,
                got.len(),
                running.spool.stats().dead_letters,
            ),
            ..Figures::default()
        };
        figs.print(started);
        figs.assert_clean();
        assert_eq!(t.delivered as usize, sent.len(), "{label}");
        assert!(
            before_2026.is_empty(),
            "{label}: received_at before 2026 sent: {before_2026:?}"
        );
        running.stop().await;
    }
}

// ---------------------------------------------------------------------------------------
// 6. Fuzzing the configuration parsers, and a corpus of malformed payloads

const AGENT_EXAMPLE: &str = include_str!("../systemd/agent.example.toml");
const SITE_EXAMPLE: &str = include_str!("../systemd/site.example.toml");

/// Tokens that mean something to TOML or to the validators.
const TOKENS: &[&str] = &[
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "\"",
    "'",
    "\"\"\"",
    "#",
    "\n",
    ",",
    "{",
    "}",
    ".",
    "0",
    "-1",
    "65536",
    "4294967296",
    "18446744073709551616",
    "1e309",
    "nan",
    "inf",
    "true",
    "\"\"",
    "\"x\"",
    "[mqtt]",
    "[chekt]",
    "[spool]",
    "[log]",
    "[[zone]]",
    "[[camera]]",
    "[[rule]]",
    "port = 0",
    "max_bytes = 0",
    "filter = \"#/+\"",
    "format = \"sia\"",
    "device = \"{9}\"",
    "auth = \"api_key\"",
    "api_url = \"http://x\"",
    "number = -1",
    "cameras = [99]",
    "\u{0}",
    "\u{feff}",
    "é",
    "🔥",
    "\\",
    "\\u0000",
    "0x10",
    "1979-05-27T07:32:00Z",
];

/// One edit of a valid text (a TOML-aware mutator, so most inputs get past the parser).
#[derive(Clone, Debug)]
enum Edit {
    DeleteRange(usize, usize),
    InsertToken(usize, usize),
    ReplaceLine(usize, usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    Truncate(usize),
    FlipByte(usize, u8),
    ReplaceNumber(usize, usize),
}

fn apply_edits(text: &str, edits: &[Edit]) -> String {
    let mut s = text.to_string();
    for e in edits {
        let at = |i: usize, s: &str| {
            let mut i = i % (s.len() + 1);
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            i
        };
        match e {
            Edit::DeleteRange(a, n) => {
                let a = at(*a, &s);
                let b = at(a + n % 64, &s).max(a);
                s.replace_range(a..b, "");
            }
            Edit::InsertToken(a, t) => {
                let a = at(*a, &s);
                s.insert_str(a, TOKENS[t % TOKENS.len()]);
            }
            Edit::ReplaceLine(l, t) => {
                let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
                if !lines.is_empty() {
                    let n = lines.len();
                    lines[l % n] = TOKENS[t % TOKENS.len()].to_string();
                }
                s = lines.join("\n");
            }
            Edit::DuplicateLine(l) => {
                let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
                if !lines.is_empty() {
                    let n = lines.len();
                    let line = lines[l % n].clone();
                    lines.insert(l % n, line);
                }
                s = lines.join("\n");
            }
            Edit::SwapLines(a, b) => {
                let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
                if !lines.is_empty() {
                    let n = lines.len();
                    lines.swap(a % n, b % n);
                }
                s = lines.join("\n");
            }
            Edit::Truncate(a) => {
                let a = at(*a, &s);
                s.truncate(a);
            }
            Edit::FlipByte(a, b) => {
                let a = at(*a, &s);
                let mut bytes = s.into_bytes();
                if a < bytes.len() {
                    bytes[a] ^= b | 1;
                }
                s = String::from_utf8_lossy(&bytes).into_owned();
            }
            Edit::ReplaceNumber(k, t) => {
                // The k-th run of digits becomes a token (a huge, negative or odd number).
                let numbers = [
                    "0",
                    "-1",
                    "4294967296",
                    "18446744073709551616",
                    "1.5",
                    "1e3",
                ];
                let mut runs = Vec::new();
                let b = s.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    if b[i].is_ascii_digit() {
                        let st = i;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                        runs.push((st, i));
                    } else {
                        i += 1;
                    }
                }
                if !runs.is_empty() {
                    let (a, z) = runs[k % runs.len()];
                    s.replace_range(a..z, numbers[t % numbers.len()]);
                }
            }
        }
    }
    s
}

fn edit_strategy() -> impl proptest::strategy::Strategy<Value = Vec<Edit>> {
    use proptest::prelude::*;
    let edit = prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(a, n)| Edit::DeleteRange(a, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, t)| Edit::InsertToken(a, t)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, t)| Edit::ReplaceLine(a, t)),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Edit::FlipByte(a, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, t)| Edit::ReplaceNumber(a, t)),
    ];
    proptest::collection::vec(edit, 1..6)
}

fn fuzz_runner(cases: u32, seed: u64) -> proptest::test_runner::TestRunner {
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config {
            cases,
            failure_persistence: None,
            max_shrink_iters: 2_000,
            ..Config::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// Config::parse: Ok, or an error naming the file and saying what is wrong.
fn check_config(text: &str) -> Result<bool, proptest::test_runner::TestCaseError> {
    let path = Path::new("/fuzz/agent.toml");
    match chekt_agent::config::Config::parse(text, path) {
        Ok(_) => Ok(true),
        Err(e) => {
            let msg = e.to_string();
            proptest::prop_assert!(
                msg.contains("/fuzz/agent.toml") && msg.len() > "/fuzz/agent.toml".len() + 12,
                "unspecific error: {msg:?}"
            );
            Ok(false)
        }
    }
}

fn check_site(text: &str) -> Result<bool, proptest::test_runner::TestCaseError> {
    match chekt_agent::site::SiteConfig::parse(text, "/fuzz/site.toml") {
        Ok(_) => Ok(true),
        Err(e) => {
            let msg = e.to_string();
            proptest::prop_assert!(
                msg.contains("/fuzz/site.toml") && msg.len() > "/fuzz/site.toml".len() + 12,
                "unspecific error: {msg:?}"
            );
            Ok(false)
        }
    }
}

#[test]
fn t6a_fuzz_config_and_site_parsers() {
    use proptest::prelude::*;
    let case = "6a-fuzz-parsers";
    let started = Instant::now();
    let mut rng = Seeded::new(case);
    let per_target = scale(1_500, 30_000) as u32;
    // The valid examples must parse, or the mutations below start from nothing.
    assert!(check_config(AGENT_EXAMPLE).unwrap(), "agent example parses");
    assert!(check_site(SITE_EXAMPLE).unwrap(), "site example parses");
    let mut lines = Vec::new();
    let mut total = 0u64;
    let runs: Vec<(&str, bool, &str)> = vec![
        ("config, arbitrary text", true, ""),
        ("config, mutated example", true, AGENT_EXAMPLE),
        ("site, arbitrary text", false, ""),
        ("site, mutated example", false, SITE_EXAMPLE),
    ];
    for (label, is_config, base) in runs {
        let execs = AtomicU64::new(0);
        let ok = AtomicU64::new(0);
        let mut runner = fuzz_runner(per_target, rng.next());
        let check = |text: &str| -> Result<(), TestCaseError> {
            execs.fetch_add(1, Ordering::Relaxed);
            let accepted = if is_config {
                check_config(text)?
            } else {
                check_site(text)?
            };
            ok.fetch_add(u64::from(accepted), Ordering::Relaxed);
            Ok(())
        };
        let result = if base.is_empty() {
            // Arbitrary strings, half of them from TOML-ish characters.
            let strat = prop_oneof![
                any::<String>(),
                "[a-z_\\[\\]=\"'#., 0-9\\n{}-]{0,400}",
                proptest::collection::vec(any::<u8>(), 0..600)
                    .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ];
            runner.run(&strat, |s| check(&s)).map_err(|e| e.to_string())
        } else {
            runner
                .run(&edit_strategy(), |edits| check(&apply_edits(base, &edits)))
                .map_err(|e| e.to_string())
        };
        let n = execs.load(Ordering::Relaxed);
        total += n;
        lines.push(format!(
            "{label}: {n} executions, {} accepted",
            ok.load(Ordering::Relaxed)
        ));
        if let Err(e) = result {
            panic!("{label}: {e}");
        }
    }
    Figures {
        case,
        executions: Some(total),
        notes: format!(
            "no panic; every error names the file and says what is wrong: {}",
            lines.join("; ")
        ),
        ..Figures::default()
    }
    .print(started);
}

fn corpus() -> Vec<(String, String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let manifest = std::fs::read_to_string(root.join("MANIFEST")).unwrap();
    let rules: Vec<(String, String)> = manifest
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut it = l.split_whitespace();
            (
                it.next().unwrap().to_string(),
                it.next().unwrap().to_string(),
            )
        })
        .collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir(root.join("malformed")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let topic = rules
            .iter()
            .filter(|(p, _)| name.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("no MANIFEST prefix for corpus file {name}"));
        out.push((name, topic, std::fs::read(e.path()).unwrap()));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t6b_malformed_corpus_is_dead_lettered() {
    use chekt_agent::normalize::{Inbound, normalize};
    let case = "6b-corpus";
    let Some(m) = mosquitto(case) else { return };
    let started = Instant::now();
    let files = corpus();
    assert!(files.len() >= 40, "corpus has {} files", files.len());
    // Each one must really be malformed (rejected, not ignored or accepted).
    let site =
        chekt_agent::site::SiteConfig::parse(chekt_agent::testbed::SITE_TOML, "testbed").unwrap();
    for (name, topic, payload) in &files {
        let r = normalize(
            &Inbound {
                topic,
                payload,
                received_at_ms: 1_800_000_000_000,
                msg_id: 1,
            },
            &site,
        );
        assert!(r.is_err(), "corpus file {name} is not rejected: {r:?}");
    }
    let tb = Testbed::start(sim_cfg(), Some(m.port), AgentKnobs::default())
        .await
        .unwrap();
    let running = start_in_process(&tb, None).await;
    let msgs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(_, t, p)| (t.clone(), p.clone()))
        .collect();
    publish_all(m.port, "corpus-pub", msgs).await;
    publish_all(
        m.port,
        "corpus-good",
        vec![(
            "site/panel1/events".to_string(),
            json_event("alarm", "active", Some(4), "after-the-corpus", false),
        )],
    )
    .await;
    let spool = running.spool.clone();
    support::wait_for(
        Duration::from_secs(30),
        "every corpus file dead-lettered",
        || spool.stats().dead_letters as usize >= files.len(),
    )
    .await;
    let sent = HashSet::from(["after-the-corpus".to_string()]);
    let t = wait_delivered(&tb.sim, &sent, Duration::from_secs(20)).await;
    let dead: Vec<_> = spool
        .dead_letters()
        .unwrap()
        .into_iter()
        .map(|d| d.unwrap())
        .collect();
    let mut unmatched = Vec::new();
    let mut reasons = HashSet::new();
    for (name, topic, payload) in &files {
        match dead
            .iter()
            .find(|d| &d.payload == payload && &d.topic == topic)
        {
            Some(d) => {
                assert_eq!(d.stage, "normalize", "{name}");
                assert!(d.reason.trim().len() > 8, "{name}: reason {:?}", d.reason);
                reasons.insert(d.reason.clone());
            }
            None => unmatched.push(name.clone()),
        }
    }
    let figs = Figures {
        case,
        sent: files.len() as u64 + 1,
        delivered: t.delivered + tb.sim.received().len().saturating_sub(1) as u64,
        lost: 0,
        dup_effects: t.dup_effects,
        drops: 0,
        notes: format!(
            "{} malformed payloads through mosquitto: {} dead-lettered with original bytes, {} distinct reasons, {} unmatched; the valid alarm after them delivered: {}",
            files.len(),
            dead.len(),
            reasons.len(),
            unmatched.len(),
            t.delivered == 1
        ),
        ..Figures::default()
    };
    figs.print(started);
    assert!(
        unmatched.is_empty(),
        "not dead-lettered as sent: {unmatched:?}"
    );
    assert_eq!(dead.len(), files.len(), "exactly one dead letter per file");
    assert_eq!(
        t.delivered, 1,
        "the valid alarm after the corpus is delivered"
    );
    assert_eq!(
        tb.sim.received().len(),
        1,
        "nothing malformed reached CHeKT"
    );
    assert!(
        reasons.len() * 10 >= files.len() * 8,
        "reasons are specific: {reasons:#?}"
    );
    assert!(running.task_died().is_none());
    running.stop().await;
}
