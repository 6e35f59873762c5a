//! The pipeline in process: real broker (rumqttd), real sled on disk, real TLS to the
//! simulator.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chekt_agent::pipeline::Running;
use chekt_agent::simulator::{Faults, SimConfig};
use chekt_agent::testbed::{AgentKnobs, CLIENT_ID, Testbed, leaks_secret};

use crate::support::{Mosquitto, json_event, publish_all, start_subscribed, wait_for};

async fn bed(knobs: AgentKnobs) -> Testbed {
    let sim = SimConfig {
        rate_limit: None,
        ..SimConfig::default()
    };
    Testbed::start(sim, None, knobs).await.unwrap()
}

async fn start(tb: &Testbed) -> Running {
    let r = start_subscribed(tb, None, Duration::from_secs(10)).await;
    assert_eq!(r.ingest.subscriptions_refused.load(Ordering::Relaxed), 0);
    r
}

fn msg(topic: &str, payload: impl Into<Vec<u8>>) -> (String, Vec<u8>) {
    (topic.to_string(), payload.into())
}

fn desc(r: &chekt_agent::simulator::Received) -> String {
    r.body["description"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_delivered_enriched_with_a_valid_token_and_no_secrets() {
    let tb = bed(AgentKnobs::default()).await;
    let running = start(&tb).await;
    publish_all(
        tb.broker_port,
        "p-enrich",
        vec![msg("site/panel/panel1/cid", "1234 18 1134 01 004")],
    )
    .await;
    wait_for(Duration::from_secs(10), "one event at CHeKT", || {
        tb.sim.received().len() == 1
    })
    .await;
    let r = &tb.sim.received()[0];
    assert_eq!(
        r.client, CLIENT_ID,
        "posted with an access token issued to our client"
    );
    let b = &r.body;
    assert_eq!(b["event_type"], "alarm");
    assert_eq!(b["event_status"], "active");
    assert_eq!(b["location_id"], "Z6RSOG");
    assert_eq!(b["recorder_id"], "Z6RANV");
    assert_eq!(b["zone"]["name"], "Front door");
    assert_eq!(b["zone"]["type"], "entry_exit");
    assert_eq!(
        b["camera_ids"],
        serde_json::json!([
            "2fe519b4-2438-4aa1-b051-87cf22bb0001",
            "2fe519b4-2438-4aa1-b051-87cf22bb0002"
        ])
    );
    assert_eq!(
        r.idempotency_key,
        format!("chekt-agent-{}", b["event_id"].as_str().unwrap())
    );
    assert!(r.trace_id.is_some());
    assert_eq!(leaks_secret(&b.to_string()), None, "{b}");
    assert_eq!(tb.sim.stats().token_ok, 1);
    let report = running.stop().await;
    assert!(report.not_stopped.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_spools_then_delivers_everything_once_in_class_order() {
    let tb = bed(AgentKnobs::default()).await;
    let running = start(&tb).await;
    tb.sim.set_outage(true);
    let mut msgs = Vec::new();
    for i in 0..5 {
        msgs.push(msg(
            "site/nvr1/events",
            json_event("alarm", "active", Some(9), &format!("routine-{i}"), true),
        ));
        msgs.push(msg(
            "site/panel1/events",
            json_event("arming", "armed", None, &format!("arming-{i}"), false),
        ));
        msgs.push(msg(
            "site/panel1/events",
            json_event("trouble", "active", None, &format!("trouble-{i}"), false),
        ));
        msgs.push(msg(
            "site/panel1/events",
            json_event("alarm", "active", Some(4), &format!("alarm-{i}"), false),
        ));
    }
    publish_all(tb.broker_port, "p-outage", msgs).await;
    let spool = running.spool.clone();
    wait_for(Duration::from_secs(10), "20 events spooled", || {
        spool.stats().backlog() == 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tb.sim.received().is_empty());
    tb.sim.set_outage(false);
    wait_for(Duration::from_secs(30), "20 events at CHeKT", || {
        tb.sim.received().len() == 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = tb.sim.received();
    assert_eq!(got.len(), 20, "nothing more arrived later");
    let order: Vec<String> = got.iter().map(desc).collect();
    let mut expected = Vec::new();
    for class in ["alarm", "trouble", "arming", "routine"] {
        for i in 0..5 {
            expected.push(format!("{class}-{i}"));
        }
    }
    assert_eq!(order, expected, "class order, FIFO within a class");
    assert!(got.iter().all(|r| r.deliveries == 1), "each delivered once");
    assert_eq!(spool.stats().backlog(), 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_overtakes_a_10000_event_routine_drain() {
    let tb = bed(AgentKnobs::default()).await;
    let running = start(&tb).await;
    // Keep the drain going long enough to publish into it: 1 ms per request at CHeKT.
    tb.sim.set_faults(Faults {
        latency: Duration::from_millis(1),
        ..Faults::default()
    });
    let msgs: Vec<_> = (0..10_000)
        .map(|i| {
            msg(
                "site/nvr1/events",
                json_event("alarm", "active", Some(5), &format!("r{i}"), true),
            )
        })
        .collect();
    publish_all(tb.broker_port, "p-drain", msgs).await;
    let ingest = running.ingest.clone();
    wait_for(
        Duration::from_secs(60),
        "10,000 routine events spooled",
        || {
            ingest
                .spooled_events
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 10_000
        },
    )
    .await;
    let backlog_at_alarm = running.spool.stats().backlog();
    assert!(
        backlog_at_alarm > 1000,
        "drain still running (backlog {backlog_at_alarm})"
    );
    publish_all(
        tb.broker_port,
        "p-alarm",
        vec![msg("site/panel/panel1/cid", "1234 18 1130 01 009")],
    )
    .await;
    wait_for(Duration::from_secs(20), "the alarm at CHeKT", || {
        tb.sim
            .received()
            .iter()
            .any(|r| r.body["event_type"] == "alarm" && r.body["code"] == "CID:E130")
    })
    .await;
    let got = tb.sim.received();
    let pos = got
        .iter()
        .position(|r| r.body["code"] == "CID:E130")
        .unwrap();
    let after = got.len() - pos - 1;
    assert!(
        running.spool.stats().backlog() > 0 || after > 0,
        "the alarm arrived before the drain ended"
    );
    eprintln!(
        "alarm delivered as #{} of 10,001; backlog when published {backlog_at_alarm}",
        pos + 1
    );
    assert!(
        pos < 10_000 - 500,
        "alarm did not wait behind the routine backlog (position {pos})"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_dead_lettered_and_the_agent_stays_up() {
    let tb = bed(AgentKnobs::default()).await;
    let running = start(&tb).await;
    let bad: Vec<(String, Vec<u8>)> = vec![
        msg("site/panel/panel1/cid", ""),
        msg("site/panel/panel1/cid", vec![0xff, 0xfe, 0x00, 0x81]),
        msg("site/panel/panel1/cid", "1234 18 1999 01 004"),
        msg("site/panel/panel1/cid", "1234 17 1130 01 004"),
        msg("site/panel/panel1/cid", "E13"),
        msg("site/panel/panel1/sia", "ZZ004"),
        msg("site/panel/panel1/sia", "Nri1/"),
        msg("site/nvr1/events", "{not json"),
        msg("site/nvr1/events", r#"{"type":"alarm"}"#),
        msg("site/nvr1/events", r#"{"type":"fire","status":"active"}"#),
        msg(
            "site/nvr1/events",
            r#"{"type":"alarm","status":"active","zone":-4}"#,
        ),
        msg(
            "site/nvr1/events",
            r#"{"type":"alarm","status":"active","time":"yesterday"}"#,
        ),
        msg("site/nvr1/events", "[]"),
        msg("site/nvr1/events", vec![b'x'; 70_000]),
        msg("site/nvr1/events", "null"),
    ];
    let n = bad.len();
    let originals: Vec<Vec<u8>> = bad.iter().map(|m| m.1.clone()).collect();
    publish_all(tb.broker_port, "p-bad", bad).await;
    publish_all(
        tb.broker_port,
        "p-good",
        vec![msg("site/panel/panel1/cid", "1234 18 1134 01 004")],
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "the valid alarm after the bad ones",
        || tb.sim.received().len() == 1,
    )
    .await;
    let dead: Vec<_> = running
        .spool
        .dead_letters()
        .unwrap()
        .into_iter()
        .map(|d| d.unwrap())
        .collect();
    assert_eq!(dead.len(), n, "{dead:#?}");
    for (d, orig) in dead.iter().zip(&originals) {
        assert_eq!(d.stage, "normalize");
        assert!(d.reason.len() > 8, "specific reason: {:?}", d.reason);
        assert_eq!(&d.payload, orig, "original bytes kept");
    }
    let reasons: HashSet<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert!(
        reasons.len() >= n - 2,
        "reasons are specific, not one generic message: {reasons:#?}"
    );
    assert!(running.task_died().is_none());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_budget_drops_lower_classes_first_counts_and_reports() {
    let tb = bed(AgentKnobs {
        spool_max_bytes: 64 * 1024,
        ..AgentKnobs::default()
    })
    .await;
    let running = start(&tb).await;
    tb.sim.set_outage(true);
    let mut msgs = Vec::new();
    for i in 0..1500 {
        msgs.push(msg(
            "site/nvr1/events",
            json_event("alarm", "active", Some(5), &format!("routine-{i}"), true),
        ));
        if i % 50 == 0 {
            msgs.push(msg(
                "site/panel1/events",
                json_event("trouble", "active", None, &format!("trouble-{i}"), false),
            ));
        }
        if i % 30 == 0 {
            msgs.push(msg(
                "site/panel1/events",
                json_event("alarm", "active", Some(4), &format!("alarm-{i}"), false),
            ));
        }
    }
    let alarms = (0..1500).filter(|i| i % 30 == 0).count() as u64;
    let total = msgs.len() as u64;
    publish_all(tb.broker_port, "p-budget", msgs).await;
    let ingest = running.ingest.clone();
    wait_for(Duration::from_secs(30), "everything committed", || {
        ingest
            .spooled_events
            .load(std::sync::atomic::Ordering::Relaxed)
            >= total
    })
    .await;
    let st = running.spool.stats();
    assert_eq!(st.queued[0], alarms, "every alarm kept: {st:?}");
    assert_eq!(st.dropped[0], 0);
    assert!(st.dropped[3] > 0, "routine events dropped: {st:?}");
    assert_eq!(
        st.dropped[1], 0,
        "no trouble dropped while routine events remained: {st:?}"
    );
    assert!(st.live_bytes <= 64 * 1024, "{st:?}");
    tb.sim.set_outage(false);
    wait_for(
        Duration::from_secs(30),
        "all alarms and the overflow trouble at CHeKT",
        || {
            let got = tb.sim.received();
            got.iter().filter(|r| desc(r).starts_with("alarm-")).count() as u64 == alarms
                && got.iter().any(|r| r.body["code"] == "AGENT:spool_overflow")
        },
    )
    .await;
    let got = tb.sim.received();
    let report = got
        .iter()
        .find(|r| r.body["code"] == "AGENT:spool_overflow")
        .unwrap();
    let text = desc(report);
    // The first drop is reported at once; later ones are aggregated (one report a minute).
    assert!(text.contains("dropped 0 alarm"), "{text}");
    let n: u64 = text
        .split(" and ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(n > 0 && n <= st.dropped[3], "{text}");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_store_at_start_is_set_aside_and_reported() {
    let tb = bed(AgentKnobs::default()).await;
    let spool_dir = chekt_agent::testbed::spool_dir(&tb.dir);
    std::fs::create_dir_all(&spool_dir).unwrap();
    std::fs::write(spool_dir.join("conf"), b"this is not a sled config").unwrap();
    std::fs::write(spool_dir.join("db"), vec![0x5a; 8192]).unwrap();
    let running = start(&tb).await;
    let reset = running.reset.clone().expect("reported as reset");
    assert!(
        reset.moved_to.exists(),
        "the old store is kept for inspection"
    );
    assert!(reset.moved_to.join("db").exists());
    wait_for(
        Duration::from_secs(10),
        "spool_reset trouble at CHeKT",
        || {
            tb.sim
                .received()
                .iter()
                .any(|r| r.body["code"] == "AGENT:spool_reset")
        },
    )
    .await;
    // And the fresh store works.
    publish_all(
        tb.broker_port,
        "p-after",
        vec![msg("site/panel/panel1/cid", "1234 18 1134 01 004")],
    )
    .await;
    wait_for(Duration::from_secs(10), "an alarm after the reset", || {
        tb.sim.received().len() == 2
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_retry_with_the_same_key_and_4xx_dead_letters() {
    let sim = SimConfig {
        rate_limit: None,
        known_locations: Some(vec!["Z6RSOG".into()]),
        ..SimConfig::default()
    };
    let tb = Testbed::start(sim, None, AgentKnobs::default())
        .await
        .unwrap();
    let running = start(&tb).await;
    tb.sim.set_faults(Faults {
        error_rates: vec![(503, 0.5)],
        lost_response_rate: 0.3,
        ..Faults::default()
    });
    let msgs: Vec<_> = (0..40)
        .map(|i| {
            msg(
                "site/panel1/events",
                json_event("trouble", "active", None, &format!("t{i}"), false),
            )
        })
        .collect();
    publish_all(tb.broker_port, "p-faults", msgs).await;
    wait_for(
        Duration::from_secs(60),
        "40 events through 503s and lost responses",
        || {
            tb.sim
                .received()
                .iter()
                .filter(|r| r.deliveries >= 1)
                .count()
                == 40
        },
    )
    .await;
    let got = tb.sim.received();
    let keys: HashSet<_> = got.iter().map(|r| r.idempotency_key.clone()).collect();
    assert_eq!(keys.len(), 40, "one key per event, reused across retries");
    assert!(tb.sim.stats().events_replayed > 0 || tb.sim.stats().lost_responses == 0);
    tb.sim.set_faults(Faults::default());
    // A 404 for an unknown location is permanent: dead-lettered with CHeKT's envelope.
    let site = std::fs::read_to_string(&tb.site_path)
        .unwrap()
        .replace("location_id = \"Z6RSOG\"", "location_id = \"NOPE01\"");
    std::fs::write(&tb.site_path, site).unwrap();
    running.reload_site(&tb.site_path).unwrap();
    publish_all(
        tb.broker_port,
        "p-404",
        vec![msg("site/panel/panel1/cid", "1234 18 1134 01 004")],
    )
    .await;
    let spool = running.spool.clone();
    wait_for(Duration::from_secs(10), "the 404 dead-lettered", || {
        spool.stats().dead_letters == 1
    })
    .await;
    let dl = spool.dead_letters().unwrap().pop().unwrap().unwrap();
    assert_eq!(dl.stage, "upload");
    assert!(
        dl.reason.contains("HTTP 404")
            && dl.reason.contains("location_not_found")
            && dl.reason.contains("request_id=req_"),
        "{}",
        dl.reason
    );
    assert!(running.task_died().is_none());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_site_reload_keeps_the_old_configuration() {
    let tb = bed(AgentKnobs::default()).await;
    let running = start(&tb).await;
    std::fs::write(&tb.site_path, "location_id = \"\"\n").unwrap();
    let e = running.reload_site(&tb.site_path).unwrap_err().to_string();
    assert!(e.contains("location_id"), "{e}");
    publish_all(
        tb.broker_port,
        "p-reload",
        vec![msg("site/panel/panel1/cid", "1234 18 1134 01 004")],
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "delivered with the old site",
        || tb.sim.received().len() == 1,
    )
    .await;
    assert_eq!(tb.sim.received()[0].body["zone"]["name"], "Front door");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_event_id_is_sent_once() {
    let tb = bed(AgentKnobs::default()).await;
    let running = start(&tb).await;
    let p = br#"{"type":"alarm","status":"active","zone":4,"event_id":"nvr1-88123"}"#.to_vec();
    publish_all(
        tb.broker_port,
        "p-dup",
        vec![
            msg("site/nvr1/events", p.clone()),
            msg("site/nvr1/events", p.clone()),
        ],
    )
    .await;
    let ingest = running.ingest.clone();
    wait_for(Duration::from_secs(10), "both copies processed", || {
        ingest
            .duplicates_skipped
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
            && tb.sim.received().len() == 1
    })
    .await;
    // Later, in another batch, again.
    publish_all(tb.broker_port, "p-dup2", vec![msg("site/nvr1/events", p)]).await;
    wait_for(Duration::from_secs(10), "third copy recognised", || {
        ingest
            .duplicates_skipped
            .load(std::sync::atomic::Ordering::Relaxed)
            == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = tb.sim.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].deliveries, 1);
    assert_eq!(
        running.spool.stats().dead_letters,
        0,
        "no 409 conflict from a second body"
    );
    running.stop().await;
}

/// A filter the broker's ACL refuses is reported: counted, shown in the status line and
/// raised to CHeKT as a trouble event; the granted filters keep working. mosquitto with its
/// dynamic-security plugin, which answers a refused SUBSCRIBE with 0x80 (rumqttd has no ACLs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscription_is_raised_as_trouble() {
    // Anonymous clients may publish under site/ and subscribe to two of the testbed's three
    // filters: `site/panel/+/sia` is refused.
    let dynsec = r#"{
      "defaultACLAccess": {"publishClientSend": false, "publishClientReceive": true,
                           "subscribe": false, "unsubscribe": true},
      "clients": [],
      "groups": [{"groupname": "anonymous", "roles": [{"rolename": "site"}], "clients": []}],
      "roles": [{"rolename": "site", "acls": [
        {"acltype": "publishClientSend", "topic": "site/#", "priority": 0, "allow": true},
        {"acltype": "subscribeLiteral", "topic": "site/+/events", "priority": 0, "allow": true},
        {"acltype": "subscribeLiteral", "topic": "site/panel/+/cid", "priority": 0, "allow": true}
      ]}],
      "anonymousGroup": "anonymous"
    }"#;
    let Some(m) = Mosquitto::start_with(Some(dynsec)) else {
        return;
    };
    let sim = SimConfig {
        rate_limit: None,
        ..SimConfig::default()
    };
    let tb = Testbed::start(sim, Some(m.port), AgentKnobs::default())
        .await
        .unwrap();
    let running = start_subscribed(&tb, None, Duration::from_secs(10)).await;
    assert_eq!(
        running.ingest.subscriptions_refused.load(Ordering::Relaxed),
        1
    );
    let status = running.status_line();
    assert!(
        status.contains("broker connected, 1 subscription(s) REFUSED"),
        "{status}"
    );
    publish_all(
        m.port,
        "acl-pub",
        vec![msg(
            "site/panel1/events",
            json_event("alarm", "active", Some(3), "granted filter", false),
        )],
    )
    .await;
    wait_for(
        Duration::from_secs(20),
        "alarm and trouble at CHeKT",
        || tb.sim.received().len() >= 2,
    )
    .await;
    let got = tb.sim.received();
    assert!(got.iter().any(|r| desc(r) == "granted filter"));
    let trouble: Vec<_> = got
        .iter()
        .filter(|r| r.body["code"] == "AGENT:subscription_refused")
        .collect();
    assert_eq!(trouble.len(), 1, "{got:?}");
    assert_eq!(trouble[0].body["event_type"], "trouble");
    let text = desc(trouble[0]);
    assert!(text.contains("site/panel/+/sia"), "{text}");
    assert!(!text.contains("site/+/events"), "{text}");
    running.stop().await;
}
