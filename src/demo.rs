//! `chekt-agent demo`: the agent's main job on embedded defaults, with no external
//! services. Starts the testbed (embedded MQTT broker, CHeKT simulator over TLS, a device
//! key registered with it), runs the real pipeline, publishes a scripted site — alarm and
//! restore, arm and disarm, an AC-loss trouble, an analytics detection, a malformed
//! payload — takes CHeKT offline for a while and back, and prints what CHeKT received.
//!
//! Invariant: the demo reports what it observed at the simulator; it fails (non-zero exit)
//! if any expected event is missing, duplicated, or carries a local secret.

use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};
use rumqttc::QoS;

use crate::pipeline::{Options, Running};
use crate::simulator::{RateLimit, SimConfig};
use crate::testbed::{AgentKnobs, Testbed, leaks_secret};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// How long CHeKT stays offline in the middle of the script.
    #[arg(long, default_value_t = 3)]
    pub outage_secs: u64,
    /// Keep the scratch directory (config, site file, spool) and print its path.
    #[arg(long)]
    pub keep: bool,
}

/// (topic, payload, what it is)
const BEFORE: &[(&str, &str, &str)] = &[
    (
        "site/panel/panel1/cid",
        "1234 18 1134 01 004",
        "burglary alarm, zone 4 (Contact ID)",
    ),
    (
        "site/panel/panel1/cid",
        "1234 18 3134 01 004",
        "burglary restore, zone 4 (Contact ID)",
    ),
    (
        "site/panel/panel1/sia",
        "Nri1/CL001",
        "armed by user 1 (SIA)",
    ),
    (
        "site/panel/panel1/sia",
        "Nri1/OP001",
        "disarmed by user 1 (SIA)",
    ),
    (
        "site/panel/panel1/cid",
        "1234 18 1301 00 000",
        "AC loss trouble (Contact ID)",
    ),
    (
        "site/nvr1/events",
        r#"{"type":"alarm","status":"active","zone":5,"camera_channel":2,"description":"Person detected in hallway"}"#,
        "analytics detection (JSON)",
    ),
    (
        "site/panel/panel1/cid",
        "hello, I am not Contact ID",
        "malformed payload",
    ),
];

const DURING_OUTAGE: &[(&str, &str, &str)] = &[
    (
        "site/panel/panel1/cid",
        "1234 18 1130 01 009",
        "burglary alarm, zone 9, while CHeKT is offline",
    ),
    (
        "site/panel/panel1/cid",
        "1234 18 3301 00 000",
        "AC restored, while CHeKT is offline",
    ),
    (
        "site/panel/panel1/cid",
        "1234 18 3130 01 009",
        "zone 9 restore, while CHeKT is offline",
    ),
];

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    println!(
        "chekt-agent demo: embedded MQTT broker + CHeKT simulator (HTTPS, test CA), real spool on disk\n"
    );
    let sim_cfg = SimConfig {
        rate_limit: Some(RateLimit::PRO),
        ..SimConfig::default()
    };
    let knobs = AgentKnobs {
        rate_per_minute: 600,
        burst: 30,
        mqtt_client_id: "chekt-agent-demo".into(),
        ..AgentKnobs::default()
    };
    let mut tb = Testbed::start(sim_cfg, None, knobs).await?;
    tb.keep = args.keep;
    let (cfg, site) = tb.config()?;
    println!(
        "device key kid {} registered with the simulator for client {}",
        tb.key.kid(),
        crate::testbed::CLIENT_ID
    );
    let running = Running::start(
        &cfg,
        site,
        Options {
            keys: Some(tb.key_store()),
            grace: Some(Duration::from_secs(2)),
            ..Options::default()
        },
    )
    .await?;
    let publisher = tb.publisher("demo-site-panel");
    // Let the agent connect and subscribe before publishing.
    wait_for(Duration::from_secs(10), || {
        running
            .ingest
            .subscribed
            .load(std::sync::atomic::Ordering::Relaxed)
    })
    .await
    .context("the agent did not connect and subscribe to the embedded broker")?;

    let expected_before = BEFORE.len() - 1; // the malformed one is dead-lettered
    for (topic, payload, what) in BEFORE {
        println!("publish  {topic:<24} {payload:<48} {what}");
        publisher
            .publish(*topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await?;
    }
    wait_for(Duration::from_secs(20), || {
        tb.sim.received().len() >= expected_before
    })
    .await
    .context("events were not delivered")?;

    println!(
        "\n-- CHeKT goes offline for {} s (connections refused) --",
        args.outage_secs
    );
    tb.sim.set_outage(true);
    for (topic, payload, what) in DURING_OUTAGE {
        println!("publish  {topic:<24} {payload:<48} {what}");
        publisher
            .publish(*topic, QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
            .await?;
    }
    let outage_started = Instant::now();
    wait_for(Duration::from_secs(10), || {
        running.spool.stats().backlog() >= DURING_OUTAGE.len() as u64
    })
    .await
    .context("events published during the outage were not spooled")?;
    println!(
        "spooled while offline: backlog {}",
        running.spool.stats().backlog()
    );
    tokio::time::sleep(
        Duration::from_secs(args.outage_secs).saturating_sub(outage_started.elapsed()),
    )
    .await;
    tb.sim.set_outage(false);
    println!("-- CHeKT back online --\n");
    let total = expected_before + DURING_OUTAGE.len();
    wait_for(Duration::from_secs(30), || tb.sim.received().len() >= total)
        .await
        .context("spooled events were not delivered after the outage")?;
    tokio::time::sleep(Duration::from_millis(300)).await; // let any duplicate show up

    let received = tb.sim.received();
    println!("What CHeKT received ({} events):", received.len());
    println!(
        "{:<3} {:<8} {:<8} {:<22} {:<9} {:<12} {:>10}",
        "#", "type", "status", "zone", "cameras", "code", "latency"
    );
    let mut latencies = Vec::new();
    let mut leaked = Vec::new();
    for (i, r) in received.iter().enumerate() {
        let b = &r.body;
        let zone = b.get("zone").map(|z| {
            format!(
                "{} {}",
                z.get("number").map(|n| n.to_string()).unwrap_or_default(),
                z.get("name").and_then(|n| n.as_str()).unwrap_or("")
            )
        });
        let cams = b
            .get("camera_ids")
            .and_then(|c| c.as_array())
            .map(|a| a.len())
            .unwrap_or(0);
        let at_ms =
            r.at.duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
        let lat = at_ms
            - b.get("received_at")
                .and_then(|v| v.as_i64())
                .unwrap_or(at_ms);
        latencies.push(lat);
        if let Some(s) = leaks_secret(&b.to_string()) {
            leaked.push(s);
        }
        println!(
            "{:<3} {:<8} {:<8} {:<22} {:<9} {:<12} {:>8} ms",
            i + 1,
            b.get("event_type").and_then(|v| v.as_str()).unwrap_or("?"),
            b.get("event_status")
                .and_then(|v| v.as_str())
                .unwrap_or("?"),
            zone.unwrap_or_else(|| "-".into()),
            cams,
            b.get("code").and_then(|v| v.as_str()).unwrap_or("-"),
            lat
        );
    }
    let dead = running.spool.dead_letters()?;
    println!("\nDead letters ({}):", dead.len());
    for d in dead.iter().flatten() {
        println!(
            "  topic {} reason: {} bytes: {:?}",
            d.topic,
            d.reason,
            String::from_utf8_lossy(&d.payload)
        );
    }
    let stats = tb.sim.stats();
    let mut sorted = latencies.clone();
    sorted.sort_unstable();
    let p50 = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let max = sorted.last().copied().unwrap_or(0);
    let idle_max = latencies
        .iter()
        .take(expected_before)
        .max()
        .copied()
        .unwrap_or(0);
    println!("\nSummary");
    println!(
        "  published            {}",
        BEFORE.len() + DURING_OUTAGE.len()
    );
    println!(
        "  delivered to CHeKT   {}  (expected {total})",
        received.len()
    );
    println!(
        "  dead-lettered        {}  (the malformed payload)",
        dead.len()
    );
    println!(
        "  duplicate deliveries {}",
        received.iter().filter(|r| r.deliveries > 1).count()
    );
    println!(
        "  latency publish->CHeKT: p50 {p50} ms, max while online {idle_max} ms, max {max} ms (includes the outage)"
    );
    println!(
        "  token requests ok {} rejected {}; event POSTs accepted {}",
        stats.token_ok, stats.token_rejected, stats.events_accepted
    );
    println!(
        "  local secrets in what CHeKT received: {}",
        if leaked.is_empty() {
            "none".to_string()
        } else {
            format!("{leaked:?}")
        }
    );
    if args.keep {
        println!("  scratch directory kept: {}", tb.dir.display());
    }
    let report = running.stop().await;
    if !report.not_stopped.is_empty() {
        bail!("did not stop cleanly: {:?}", report.not_stopped);
    }
    if received.len() != total || dead.len() != 1 || !leaked.is_empty() {
        bail!("demo outcome differs from the script (see above)");
    }
    println!("\ndemo OK");
    Ok(())
}

async fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
