//! The project's figures, measured on the real binary: ingest -> durable throughput, end-to-
//! end throughput over TLS, alarm latency (idle and during a 100,000-event drain), memory,
//! disk writes per event, store size after fill-and-drain cycles, CPU per delivered event,
//! binary size. Not a timed test: it prints figures; BENCHMARKS.md records them.
//!
//!     cargo bench --bench figures            # full run (a few minutes)
//!     cargo bench --bench figures -- --quick # smaller counts, for a smoke check
//!
//! Set CHEKT_AGENT_BIN to measure another build of the agent (e.g. the device build);
//! the default is the bench profile's own binary. mosquitto (Debian package) is the broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use chekt_agent::config::SpoolConfig;
use chekt_agent::event::{Class, Event, EventStatus, EventType};
use chekt_agent::simulator::SimConfig;
use chekt_agent::spool::Spool;
use chekt_agent::testbed::{AgentKnobs, Testbed};
use rumqttc::{AsyncClient, Event as MEvent, MqttOptions, Packet, QoS};

struct Scale {
    ingest: usize,
    e2e: usize,
    alarms: usize,
    drain: usize,
    backlog: usize,
    sustained_secs: u64,
    cycles: usize,
    cycle_events: usize,
}

const FULL: Scale = Scale {
    ingest: 200_000,
    e2e: 100_000,
    alarms: 200,
    drain: 100_000,
    backlog: 1_000_000,
    sustained_secs: 20,
    cycles: 3,
    cycle_events: 100_000,
};
const QUICK: Scale = Scale {
    ingest: 20_000,
    e2e: 10_000,
    alarms: 40,
    drain: 10_000,
    backlog: 100_000,
    sustained_secs: 5,
    cycles: 2,
    cycle_events: 20_000,
};

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { QUICK } else { FULL };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(&scale, quick))
}

fn agent_bin() -> PathBuf {
    std::env::var_os("CHEKT_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_chekt-agent")))
}

// ---------------------------------------------------------------- processes and /proc

struct Mosquitto {
    port: u16,
    child: Child,
    _dir: PathBuf,
}

impl Mosquitto {
    fn start() -> anyhow::Result<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("mosquitto is needed: apt-get install mosquitto")?;
        let dir = std::env::temp_dir().join(format!("chekt-bench-mosq-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let port = chekt_agent::testbed::free_port()?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 100\nlog_dest none\n"
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Mosquitto {
                    port,
                    child,
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("mosquitto did not start")
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// The agent process plus a systemd-style notify socket it reports its status line to.
struct Agent {
    child: Child,
    status: Arc<Mutex<String>>,
    _sock_dir: PathBuf,
}

impl Agent {
    fn start(config: &Path, cpus: Option<&str>) -> anyhow::Result<Agent> {
        let sock_dir = std::env::temp_dir().join(format!(
            "chekt-bench-notify-{}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&sock_dir)?;
        let sock_path = sock_dir.join("notify");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path)?;
        let status = Arc::new(Mutex::new(String::new()));
        let st = status.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(line) = text.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                    *st.lock().unwrap() = line.to_string();
                }
            }
        });
        // Like systemd: WATCHDOG_PID must name the agent itself, so a shell exports its own
        // pid and execs the agent (through taskset when pinned), keeping that pid.
        let pin = cpus.map(|c| format!("taskset -c {c} ")).unwrap_or_default();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("WATCHDOG_PID=$$ exec {pin}\"$0\" \"$@\""))
            .arg(agent_bin());
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "100000")
            .env("RUST_LOG", "warn")
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(sock_dir.join("agent.log"))?)
            .spawn()
            .context("spawning the agent")?;
        Ok(Agent {
            child,
            status,
            _sock_dir: sock_dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last STATUS= line and the tail of the agent's log, for error messages.
    fn diagnose(&self) -> String {
        let log = std::fs::read_to_string(self._sock_dir.join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| !l.contains("will retry") && !l.contains("access token yet"))
            .rev()
            .take(15)
            .collect();
        format!(
            "last status: {:?}\nagent log tail:\n{}",
            self.status.lock().unwrap(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Backlog from the last STATUS= line.
    fn backlog(&self) -> Option<u64> {
        let s = self.status.lock().unwrap().clone();
        s.strip_prefix("backlog ")?.split(' ').next()?.parse().ok()
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = std::fs::remove_dir_all(&self._sock_dir);
    }
}

/// The agent's own pid (taskset execs it, so the pid is the same).
fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> (u64, u64) {
    (
        proc_field(pid, "status", "VmRSS:"),
        proc_field(pid, "status", "VmHWM:"),
    )
}

fn write_bytes(pid: u32) -> u64 {
    proc_field(pid, "io", "write_bytes:")
}

/// user+sys CPU seconds of a process.
fn cpu_secs(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit_once(") ").map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0 // USER_HZ is 100 on Linux
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

// ---------------------------------------------------------------- MQTT publishing

fn routine(i: usize) -> Vec<u8> {
    format!(r#"{{"type":"alarm","status":"active","zone":5,"priority":"routine","description":"bench routine event {i}"}}"#).into_bytes()
}

fn alarm(i: usize) -> Vec<u8> {
    format!(r#"{{"type":"alarm","status":"active","zone":4,"description":"bench alarm {i}"}}"#)
        .into_bytes()
}

/// A QoS-1 publisher that counts broker PUBACKs.
struct Publisher {
    client: AsyncClient,
    acked: Arc<AtomicU64>,
}

impl Publisher {
    fn new(port: u16, id: &str) -> Publisher {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(60)).set_inflight(200);
        let (client, mut el) = AsyncClient::new(o, 10_000);
        let acked = Arc::new(AtomicU64::new(0));
        let a = acked.clone();
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(MEvent::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Publisher { client, acked }
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    async fn wait_acked(&self, n: u64) {
        while self.acked.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Publish routine events at 1,000 a second (in bursts of 10) for `secs`; returns how many.
async fn publish_at_1000_per_s(publisher: &Publisher, secs: u64) -> usize {
    let t0 = Instant::now();
    let mut n = 0usize;
    while t0.elapsed() < Duration::from_secs(secs) {
        for _ in 0..10 {
            publisher.publish("site/nvr1/events", routine(n)).await;
            n += 1;
        }
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            t0 + Duration::from_millis(n as u64),
        ))
        .await;
    }
    n
}

async fn wait_until(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

async fn bed(broker: u16, spool_max: u64) -> anyhow::Result<Testbed> {
    let knobs = AgentKnobs {
        spool_max_bytes: spool_max,
        rate_per_minute: 60_000_000,
        burst: 1_000_000,
        mqtt_client_id: "chekt-agent-bench".into(),
        ..AgentKnobs::default()
    };
    Testbed::start(
        SimConfig {
            rate_limit: None,
            ..SimConfig::default()
        },
        Some(broker),
        knobs,
    )
    .await
}

// ---------------------------------------------------------------- the run

async fn run(s: &Scale, quick: bool) -> anyhow::Result<()> {
    println!(
        "chekt-agent figures ({}), agent binary {}",
        if quick { "quick" } else { "full" },
        agent_bin().display()
    );
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel()
    );
    let mosq = Mosquitto::start()?;
    let encoded = encoded_size();
    println!("encoded spool record: {encoded} bytes per routine event\n");

    // 1. ingest -> durable, agent pinned to one core, CHeKT offline.
    {
        let tb = bed(mosq.port, 8 << 30).await?;
        tb.sim.set_outage(true);
        let agent = Agent::start(&tb.config_path, Some("0"))?;
        wait_until(Duration::from_secs(20), "agent status", || {
            agent.backlog().is_some()
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pid = agent.pid();
        let (w0, c0) = (write_bytes(pid), cpu_secs(pid));
        let publisher = Publisher::new(mosq.port, "bench-ingest");
        let t0 = Instant::now();
        for i in 0..s.ingest {
            publisher.publish("site/nvr1/events", routine(i)).await;
        }
        publisher.wait_acked(s.ingest as u64).await;
        let published = t0.elapsed();
        if let Err(e) = wait_until(Duration::from_secs(120), "everything durable", || {
            agent.backlog() >= Some(s.ingest as u64)
        })
        .await
        {
            bail!("{e}: {}", agent.diagnose());
        }
        let durable = t0.elapsed();
        let (w1, c1) = (write_bytes(pid), cpu_secs(pid));
        let per_event = (w1 - w0) as f64 / s.ingest as f64;
        println!(
            "ingest -> durable (agent on 1 core, CHeKT offline, {} events):",
            s.ingest
        );
        println!(
            "  {:.0} events/s durable (publisher done after {:.2} s, all durable after {:.2} s, status resolution 0.1 s)",
            s.ingest as f64 / durable.as_secs_f64(),
            published.as_secs_f64(),
            durable.as_secs_f64()
        );
        println!(
            "  disk written: {:.0} bytes/event = {:.2} x the encoded record; agent CPU {:.1} us/event",
            per_event,
            per_event / encoded as f64,
            (c1 - c0) * 1e6 / s.ingest as f64
        );
        agent.stop();
    }

    // 2. end to end over TLS, rate limit off; CPU per delivered event.
    {
        let tb = bed(mosq.port, 8 << 30).await?;
        let agent = Agent::start(&tb.config_path, None)?;
        wait_until(Duration::from_secs(20), "agent status", || {
            agent.backlog().is_some()
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pid = agent.pid();
        let c0 = cpu_secs(pid);
        let publisher = Publisher::new(mosq.port, "bench-e2e");
        let t0 = Instant::now();
        for i in 0..s.e2e {
            publisher.publish("site/nvr1/events", routine(i)).await;
        }
        wait_until(Duration::from_secs(900), "all delivered", || {
            tb.sim.stats().events_accepted >= s.e2e as u64
        })
        .await?;
        let took = t0.elapsed();
        let cpu = cpu_secs(pid) - c0;
        println!(
            "\nend to end (publish -> CHeKT simulator over TLS, rate limit off, {} events):",
            s.e2e
        );
        println!(
            "  {:.0} events/s delivered; agent CPU {:.2} s user+sys = {:.1} us/event = {:.2} s per 100,000",
            s.e2e as f64 / took.as_secs_f64(),
            cpu,
            cpu * 1e6 / s.e2e as f64,
            cpu * 100_000.0 / s.e2e as f64
        );
        let (rss, hwm) = rss_kib(pid);
        println!(
            "  RSS after the run {:.1} MiB, peak {:.1} MiB",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        agent.stop();
    }

    // 3. alarm latency, idle and during a drain; memory idle and at 1,000 events/s.
    {
        let tb = bed(mosq.port, 8 << 30).await?;
        let agent = Agent::start(&tb.config_path, None)?;
        wait_until(Duration::from_secs(20), "agent status", || {
            agent.backlog().is_some()
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pid = agent.pid();
        let (idle_rss, idle_hwm) = rss_kib(pid);
        let publisher = Publisher::new(mosq.port, "bench-latency");
        let mut rx = tb.sim.subscribe();
        let mut idle = Vec::new();
        for i in 0..s.alarms {
            let sent = now_ms();
            publisher.publish("site/panel1/events", alarm(i)).await;
            let r = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await??;
            idle.push((r.at.duration_since(UNIX_EPOCH)?.as_millis() as i64 - sent) as f64);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        idle.sort_by(f64::total_cmp);
        println!(
            "\nalarm latency publish -> CHeKT receipt, idle ({} alarms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            idle.len(),
            percentile(&idle, 0.5),
            percentile(&idle, 0.99),
            idle.last().copied().unwrap_or(f64::NAN)
        );

        // Drain: spool the routine backlog while CHeKT is offline, then let it drain and
        // publish alarms into the drain.
        tb.sim.set_outage(true);
        let base = tb.sim.stats().events_accepted;
        for i in 0..s.drain {
            publisher.publish("site/nvr1/events", routine(i)).await;
        }
        wait_until(Duration::from_secs(600), "backlog spooled", || {
            agent.backlog() >= Some(s.drain as u64)
        })
        .await?;
        let mut rx = tb.sim.subscribe();
        tb.sim.set_outage(false);
        let mut during = Vec::new();
        let mut i = 0;
        while tb.sim.stats().events_accepted < base + s.drain as u64 && during.len() < s.alarms {
            let sent = now_ms();
            let tag = format!("bench drain alarm {i}");
            publisher
                .publish(
                    "site/panel1/events",
                    format!(
                        r#"{{"type":"alarm","status":"active","zone":4,"description":"{tag}"}}"#
                    )
                    .into_bytes(),
                )
                .await;
            let got = tokio::time::timeout(Duration::from_secs(30), async {
                loop {
                    match rx.recv().await {
                        Ok(r) if r.body["description"] == tag.as_str() => return Ok(r),
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
            })
            .await??;
            let remaining = (base + s.drain as u64).saturating_sub(tb.sim.stats().events_accepted);
            if remaining > 0 {
                during.push((got.at.duration_since(UNIX_EPOCH)?.as_millis() as i64 - sent) as f64);
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        during.sort_by(f64::total_cmp);
        println!(
            "alarm latency during a {}-event routine drain ({} alarms published while it ran): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            s.drain,
            during.len(),
            percentile(&during, 0.5),
            percentile(&during, 0.99),
            during.last().copied().unwrap_or(f64::NAN)
        );
        wait_until(Duration::from_secs(600), "drain finished", || {
            agent.backlog() == Some(0)
        })
        .await?;

        // 1,000 events/s sustained.
        let before = rss_kib(pid);
        let n = publish_at_1000_per_s(&publisher, s.sustained_secs).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss, hwm) = rss_kib(pid);
        println!(
            "\nmemory (VmRSS / VmHWM): idle {:.1} / {:.1} MiB; after {} s at 1,000 events/s ({} events) {:.1} / {:.1} MiB (peak includes the drain above: {:.1} MiB before this phase)",
            idle_rss as f64 / 1024.0,
            idle_hwm as f64 / 1024.0,
            s.sustained_secs,
            n,
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0,
            before.1 as f64 / 1024.0
        );
        agent.stop();
    }

    // 3b. memory at 1,000 events/s from a fresh start (peak not inflated by the drain).
    {
        let tb = bed(mosq.port, 8 << 30).await?;
        let agent = Agent::start(&tb.config_path, None)?;
        wait_until(Duration::from_secs(20), "agent status", || {
            agent.backlog().is_some()
        })
        .await?;
        let publisher = Publisher::new(mosq.port, "bench-sustained");
        let pid = agent.pid();
        let n = publish_at_1000_per_s(&publisher, s.sustained_secs).await;
        let delivered = tb.sim.stats().events_accepted;
        let (rss, hwm) = rss_kib(pid);
        println!(
            "memory at 1,000 events/s from a fresh start, {} s ({} published, {} delivered so far): VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            s.sustained_secs,
            n,
            delivered,
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        agent.stop();
    }

    // 4. memory at start with a large backlog on disk (CHeKT offline so it stays there).
    {
        let tb = bed(mosq.port, 8 << 30).await?;
        let cfg = tb.config()?.0;
        let t0 = Instant::now();
        fill_store(&cfg.spool, s.backlog)?;
        let fill = t0.elapsed();
        let disk = chekt_agent::spool::dir_size(&cfg.spool.dir);
        tb.sim.set_outage(true);
        let t1 = Instant::now();
        let agent = Agent::start(&tb.config_path, None)?;
        wait_until(
            Duration::from_secs(300),
            "agent status with the backlog",
            || agent.backlog() >= Some(s.backlog as u64),
        )
        .await?;
        let ready = t1.elapsed();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss, hwm) = rss_kib(agent.pid());
        println!(
            "\nstart with a {}-event backlog on disk ({:.0} MiB store, filled in {:.1} s): ready in {:.1} s, VmRSS {:.1} MiB, VmHWM {:.1} MiB",
            s.backlog,
            disk as f64 / 1048576.0,
            fill.as_secs_f64(),
            ready.as_secs_f64(),
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
        agent.stop();
    }

    // 5. store size vs live data over fill-and-drain cycles (in process).
    {
        let dir = std::env::temp_dir().join(format!("chekt-bench-cycles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = spool_cfg(&dir);
        println!(
            "\nstore size after fill-and-drain cycles of {} events:",
            s.cycle_events
        );
        for c in 0..s.cycles {
            fill_store(&cfg, s.cycle_events)?;
            let (spool, _) = Spool::open(&cfg)?;
            let full_disk = spool.disk_bytes();
            let live = spool.stats().live_bytes;
            while let Some((k, _)) = spool.peek()? {
                spool.ack(&k)?;
            }
            spool.sync()?;
            println!(
                "  cycle {}: full {:.1} MiB on disk for {:.1} MiB live; drained: {:.1} MiB on disk, {} bytes live",
                c + 1,
                full_disk as f64 / 1048576.0,
                live as f64 / 1048576.0,
                spool.disk_bytes() as f64 / 1048576.0,
                spool.stats().live_bytes
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    // 6. binary sizes that exist in this tree.
    println!("\nbinary sizes (stripped release builds found):");
    for (name, path) in [
        ("this bench's binary (default features)", agent_bin()),
        (
            "x86_64 device build",
            PathBuf::from("target/release/chekt-agent"),
        ),
        (
            "aarch64-gnu",
            PathBuf::from("target/aarch64-unknown-linux-gnu/release/chekt-agent"),
        ),
        (
            "armv7-gnueabihf",
            PathBuf::from("target/armv7-unknown-linux-gnueabihf/release/chekt-agent"),
        ),
        (
            "aarch64-musl",
            PathBuf::from("target/aarch64-unknown-linux-musl/release/chekt-agent"),
        ),
    ] {
        if let Ok(m) = std::fs::metadata(&path) {
            println!(
                "  {name}: {:.2} MiB ({})",
                m.len() as f64 / 1048576.0,
                path.display()
            );
        }
    }
    drop(mosq);
    Ok(())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_default()
}

fn spool_cfg(dir: &Path) -> SpoolConfig {
    SpoolConfig {
        dir: dir.join("spool"),
        max_bytes: 8 << 30,
        cache_bytes: 2 << 20,
        max_batch: 512,
        max_dead_letters: 10_000,
    }
}

fn sample_event(i: usize) -> Event {
    Event {
        id: format!("{:032x}", i),
        class: Class::Other,
        event_type: EventType::Alarm,
        status: EventStatus::Active,
        location_id: chekt_agent::testbed::LOCATION.into(),
        recorder_id: Some("Z6RANV".into()),
        device_id: "nvr1".into(),
        zone: Some(chekt_agent::event::ZoneRef {
            number: 5,
            name: Some("Hallway motion".into()),
            zone_type: Some("interior".into()),
        }),
        partition: Some(1),
        user: None,
        camera_ids: vec!["2fe519b4-2438-4aa1-b051-87cf22bb0002".into()],
        code: None,
        description: format!("bench routine event {i}"),
        device_time_ms: None,
        received_at_ms: now_ms(),
    }
}

fn encoded_size() -> usize {
    postcard::to_stdvec(&sample_event(12345))
        .map(|v| v.len() + 1)
        .unwrap_or(0)
}

/// Write `n` events straight into a spool store, 512 per durable commit.
fn fill_store(cfg: &SpoolConfig, n: usize) -> anyhow::Result<()> {
    let (spool, _) = Spool::open(cfg)?;
    let mut i = 0;
    while i < n {
        let mut b = spool.batch();
        for _ in 0..512.min(n - i) {
            spool.push_event(&mut b, &sample_event(i))?;
            i += 1;
        }
        spool.commit(b)?;
    }
    Ok(())
}
