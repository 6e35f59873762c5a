//! Testbed: a whole site on one machine — an embedded MQTT broker (rumqttd), the CHeKT
//! simulator, a device key registered with it, and agent/site configuration files pointing
//! at both. Used by `chekt-agent demo` and by the integration tests; not in device builds.
//!
//! Invariants: everything listens on 127.0.0.1 only; every file lives under one scratch
//! directory that is removed on drop (unless kept); the site file carries local secrets
//! (RTSP URLs, camera credentials, notes) on purpose, so tests can prove none leave.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;

use crate::config::Config;
use crate::keys::{DeviceKey, KeyStore};
use crate::simulator::{SimConfig, Simulator};
use crate::site::SiteConfig;

/// CHeKT location id of the testbed's site.
pub const LOCATION: &str = "Z6RSOG";
/// OAuth client id the testbed registers.
pub const CLIENT_ID: &str = "gw-test-0001";
/// Secrets planted in the site file; none may ever reach CHeKT.
pub const SECRETS: [&str; 4] = [
    "hunter2-rtsp",
    "camadmin-user",
    "s3cret-cam-pass",
    "key under the mat",
];

/// The testbed site: two cameras, three zones, topic rules for each decoder.
pub const SITE_TOML: &str = r#"
location_id = "Z6RSOG"
recorder_id = "Z6RANV"

[[camera]]
channel = 1
id = "2fe519b4-2438-4aa1-b051-87cf22bb0001"
name = "Front porch"
rtsp_url = "rtsp://camadmin-user:hunter2-rtsp@192.0.2.10:554/ch1"
username = "camadmin-user"
password = "s3cret-cam-pass"

[[camera]]
channel = 2
id = "2fe519b4-2438-4aa1-b051-87cf22bb0002"
name = "Hallway"
rtsp_url = "rtsp://camadmin-user:hunter2-rtsp@192.0.2.10:554/ch2"

[[zone]]
number = 4
name = "Front door"
type = "entry_exit"
partition = 1
cameras = [1, 2]
notes = "key under the mat"

[[zone]]
number = 5
name = "Hallway motion"
type = "interior"
partition = 1
cameras = [2]

[[zone]]
number = 9
name = "Back window"
type = "perimeter"
partition = 1

[[rule]]
filter = "site/panel/+/cid"
format = "contact_id"
device = "{1}"

[[rule]]
filter = "site/panel/+/sia"
format = "sia"
device = "{1}"

[[rule]]
filter = "site/+/events"
format = "json"
device = "{1}"
"#;

/// A free TCP port on 127.0.0.1 (bound then released; fine for tests).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Start rumqttd on 127.0.0.1:`port` in its own threads. It runs until the process exits.
pub fn start_embedded_broker(port: u16) -> anyhow::Result<()> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 262144
max_inflight_count = 500
dynamic_filters = true
"#
    );
    let cfg: rumqttd::Config = toml::from_str(&text).context("embedded broker configuration")?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .context("spawning the embedded broker")?;
    // Wait until it accepts connections.
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::bail!("embedded broker did not start listening on {addr}")
}

/// Knobs for the agent configuration the testbed writes.
#[derive(Clone, Debug)]
pub struct AgentKnobs {
    pub spool_max_bytes: u64,
    pub rate_per_minute: u32,
    pub burst: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_secs: u64,
    pub mqtt_client_id: String,
    pub extra: String,
}

impl Default for AgentKnobs {
    fn default() -> Self {
        AgentKnobs {
            spool_max_bytes: 64 * 1024 * 1024,
            rate_per_minute: 6_000_000,
            burst: 100_000,
            backoff_base_ms: 50,
            backoff_max_secs: 1,
            mqtt_client_id: "chekt-agent-test".into(),
            extra: String::new(),
        }
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

pub struct Testbed {
    pub dir: PathBuf,
    pub keep: bool,
    pub broker_port: u16,
    pub sim: Simulator,
    pub key: DeviceKey,
    pub config_path: PathBuf,
    pub site_path: PathBuf,
}

impl Testbed {
    /// Start the simulator (and, when `broker_port` is None, an embedded broker on a free
    /// port), create and register a device key, write `agent.toml` and `site.toml`.
    pub async fn start(
        sim_cfg: SimConfig,
        broker_port: Option<u16>,
        knobs: AgentKnobs,
    ) -> anyhow::Result<Testbed> {
        crate::jwt::install();
        let dir = std::env::temp_dir().join(format!(
            "chekt-agent-testbed-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let broker_port = match broker_port {
            Some(p) => p,
            None => {
                let p = free_port()?;
                start_embedded_broker(p)?;
                p
            }
        };
        let sim = Simulator::start(sim_cfg.clone())
            .await
            .context("starting the CHeKT simulator")?;
        std::fs::write(dir.join("ca.pem"), sim.ca_pem())?;
        let key_dir = dir.join("state").join("keys");
        let key = DeviceKey::generate_es256()?;
        key.write_new(&key_dir.join(crate::keys::CURRENT_FILE))?;
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk().clone())?;
        sim.register_client(CLIENT_ID, vec![jwk])?;
        let tb = Testbed {
            config_path: dir.join("agent.toml"),
            site_path: dir.join("site.toml"),
            dir,
            keep: false,
            broker_port,
            sim,
            key,
        };
        std::fs::write(&tb.site_path, SITE_TOML)?;
        std::fs::write(
            &tb.config_path,
            tb.config_text(&sim_cfg.api_audience, &knobs),
        )?;
        Ok(tb)
    }

    /// The agent configuration text for this testbed.
    pub fn config_text(&self, api_audience: &str, k: &AgentKnobs) -> String {
        format!(
            r#"site_file = "site.toml"
state_dir = "state"

[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "{mqtt_id}"
reconnect_max_secs = 1

[chekt]
api_url = "{api}"
auth = "assertion"
client_id = "{client}"
token_url = "{token}"
tenant_audience = "{tenant}"
api_audience = "{aud}"
ca_file = "ca.pem"
rate_per_minute = {rate}
burst = {burst}
backoff_base_ms = {bb}
backoff_max_secs = {bm}
request_timeout_secs = 5

[spool]
max_bytes = {max}
{extra}
"#,
            port = self.broker_port,
            mqtt_id = k.mqtt_client_id,
            api = self.sim.base_url(),
            client = CLIENT_ID,
            token = self.sim.token_url(),
            tenant = self.sim.tenant_audience(),
            aud = api_audience,
            rate = k.rate_per_minute,
            burst = k.burst,
            bb = k.backoff_base_ms,
            bm = k.backoff_max_secs,
            max = k.spool_max_bytes,
            extra = k.extra,
        )
    }

    pub fn config(&self) -> anyhow::Result<(Config, SiteConfig)> {
        Ok(Config::load(&self.config_path)?)
    }

    pub fn key_store(&self) -> KeyStore {
        KeyStore::new(self.dir.join("state").join("keys"), None)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// An MQTT client for publishing, with its event loop driven in the background.
    pub fn publisher(&self, id: &str) -> rumqttc::AsyncClient {
        publisher(self.broker_port, id)
    }
}

/// An MQTT publisher client on 127.0.0.1:`port` whose event loop runs in the background.
pub fn publisher(port: u16, id: &str) -> rumqttc::AsyncClient {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(std::time::Duration::from_secs(30))
        .set_inflight(100)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 1000);
    tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    });
    client
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// True if `haystack` contains any of the testbed's planted secrets.
pub fn leaks_secret(haystack: &str) -> Option<&'static str> {
    SECRETS.iter().copied().find(|s| haystack.contains(s))
}

/// Path helper for tests: the spool directory inside a testbed's state dir.
pub fn spool_dir(dir: &Path) -> PathBuf {
    dir.join("state").join("spool")
}
