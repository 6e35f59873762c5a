//! Shared helpers: waiting, publishing with PUBACK accounting, mosquitto, the agent binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

pub const BIN: &str = env!("CARGO_BIN_EXE_chekt-agent");

/// The pipeline in process on the testbed's configuration and key (grace 1 s), returned
/// once the broker answered its SUBSCRIBE (each filter granted or refused).
pub async fn start_subscribed(
    tb: &chekt_agent::testbed::Testbed,
    clock: Option<std::sync::Arc<chekt_agent::clock::Clock>>,
    limit: Duration,
) -> chekt_agent::pipeline::Running {
    let (cfg, site) = tb.config().unwrap();
    let r = chekt_agent::pipeline::Running::start(
        &cfg,
        site,
        chekt_agent::pipeline::Options {
            keys: Some(tb.key_store()),
            grace: Some(Duration::from_secs(1)),
            clock,
        },
    )
    .await
    .unwrap();
    let ingest = r.ingest.clone();
    wait_for(limit, "agent connected and subscribed", || {
        ingest.subscribed.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    r
}

/// Poll `f` every 20 ms until it holds or `limit` passes.
pub async fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish every (topic, payload) with QoS 1 and return once the broker acknowledged all.
pub async fn publish_all(port: u16, id: &str, msgs: Vec<(String, Vec<u8>)>) {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30))
        .set_inflight(100)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 200);
    let n = msgs.len();
    let sender = tokio::spawn(async move {
        for (t, p) in msgs {
            client.publish(t, QoS::AtLeastOnce, false, p).await.unwrap();
        }
        client
    });
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < n {
        assert!(
            Instant::now() < deadline,
            "broker acknowledged only {acked} of {n} publishes"
        );
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("publisher connection failed: {e}"),
            Err(_) => panic!("publisher stalled after {acked} of {n} acks"),
        }
    }
    let client = sender.await.unwrap();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            if matches!(
                el.poll().await,
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)
            ) {
                break;
            }
        }
    })
    .await;
}

/// JSON event payload for the testbed's `site/<dev>/events` rule.
pub fn json_event(
    kind: &str,
    status: &str,
    zone: Option<u32>,
    description: &str,
    routine: bool,
) -> Vec<u8> {
    let mut v = serde_json::json!({ "type": kind, "status": status, "description": description });
    if let Some(z) = zone {
        v["zone"] = z.into();
    }
    if routine {
        v["priority"] = "routine".into();
    }
    v.to_string().into_bytes()
}

/// A mosquitto broker with persistence, on a free port, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// None when mosquitto is not installed and we are not in CI (CI must have it).
    pub fn start() -> Option<Mosquitto> {
        Mosquitto::start_with(None)
    }

    /// [`Mosquitto::start`] with mosquitto's dynamic-security plugin configured by the JSON
    /// `dynsec` (its file ACLs never refuse a SUBSCRIBE; this plugin does).
    pub fn start_with(dynsec: Option<&str>) -> Option<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("CI").is_none(),
                "mosquitto must be installed in CI (.ci/run installs it)"
            );
            eprintln!("mosquitto not installed: skipping the mosquitto variant");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = chekt_agent::testbed::free_port().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        let mut text = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 20\nlog_dest stderr\nlog_type error\n",
            dir.path().display()
        );
        if let Some(json) = dynsec {
            let plugin = std::fs::read_dir("/usr/lib")
                .unwrap()
                .filter_map(|d| d.ok())
                .map(|d| d.path().join("mosquitto_dynamic_security.so"))
                .find(|p| p.exists())
                .expect("mosquitto's dynamic-security plugin (package mosquitto)");
            let file = dir.path().join("dynamic-security.json");
            std::fs::write(&file, json).unwrap();
            text.push_str(&format!(
                "plugin {}\nplugin_opt_config_file {}\n",
                plugin.display(),
                file.display()
            ));
        }
        std::fs::write(&conf, text).unwrap();
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mosquitto");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Mosquitto {
                    port,
                    child,
                    _dir: dir,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("mosquitto did not start on port {port}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `chekt-agent ARGS` to completion; returns (status code, stdout, stderr).
pub fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .expect("run chekt-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Start `chekt-agent run --config CONFIG` in the background, logs to `log`.
pub fn spawn_agent(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn chekt-agent")
}

/// Spawn the agent binary and wait until its log says the broker answered its SUBSCRIBE.
/// On a first run that is when the broker starts keeping messages for the agent's
/// persistent session; what is published before is not kept for it.
#[allow(dead_code)] // the torture suite's; this file is also compiled into `tests/it`
pub async fn spawn_agent_subscribed(config: &Path, log: &Path) -> Child {
    let marker = chekt_agent::ingest::SUBSCRIBED_LOG;
    let count = || {
        std::fs::read_to_string(log)
            .map(|t| t.matches(marker).count())
            .unwrap_or(0)
    };
    let before = count();
    let child = spawn_agent(config, log);
    wait_for(Duration::from_secs(60), "the agent subscribed", || {
        count() > before
    })
    .await;
    child
}

pub fn scratch() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

/// Publish a probe event and wait until CHeKT has it: the agent behind `port` is connected,
/// subscribed and delivering. Slow machines and emulation need far more than a fixed sleep.
pub async fn wait_delivering(port: u16, sim: &chekt_agent::simulator::Simulator, tag: &str) {
    let probe = json_event("trouble", "active", None, tag, false);
    let start = Instant::now();
    loop {
        publish_all(
            port,
            &format!("probe-{tag}"),
            vec![("site/probe/events".to_string(), probe.clone())],
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if sim.received().iter().any(|r| r.body["description"] == tag) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Published before the agent subscribed: a non-persistent message for nobody. Again.
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the agent never delivered the probe {tag}"
        );
    }
}
