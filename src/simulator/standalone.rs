//! The simulator as a standalone program for partners: command-line arguments
//! ([`SimArgs`]) and [`run_standalone`], which starts a [`Simulator`], writes the test CA to
//! `<out-dir>/ca.pem`, registers clients and API keys, prints where to point an agent, and
//! then prints one JSON line per accepted event on stdout until told to stop.
//!
//! Invariants: stdout carries only the start-up lines (`base_url=`, `token_url=`,
//! `events_url=`, `tenant_audience=`, `ca_pem=`) and the event lines (one JSON object each),
//! so it can be piped; diagnostics go through `tracing`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use jsonwebtoken::jwk::Jwk;
use tokio::sync::broadcast::error::RecvError;

use super::{
    DEFAULT_API_AUDIENCE, DEFAULT_PARTNER_CLAIM, RateLimit, Received, SimConfig, Simulator,
};

/// `chekt-agent simulator` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub bind: SocketAddr,
    /// Directory to write the generated test CA (`ca.pem`) to.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Register a client's public key(s): CLIENT_ID=PATH, PATH holding one JWK or a JSON
    /// array of at most 2 JWKs (each with a `kid`). Repeatable.
    #[arg(long = "register", value_name = "CLIENT_ID=PATH", value_parser = parse_register)]
    pub register: Vec<(String, PathBuf)>,
    /// Accept this static API key as a bearer token. Repeatable.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// Token-bucket refill per app and minute on the event endpoint; 0 turns limiting off.
    #[arg(long, default_value_t = 600)]
    pub rate_limit_per_minute: u32,
    /// Token-bucket size (requests allowed at once).
    #[arg(long, default_value_t = 30)]
    pub burst: u32,
    /// The `audience` form parameter the token endpoint requires.
    #[arg(long, default_value = DEFAULT_API_AUDIENCE)]
    pub api_audience: String,
    /// Name of the partner-claim form parameter.
    #[arg(long, default_value = DEFAULT_PARTNER_CLAIM)]
    pub partner_claim: String,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_lifetime_secs: u64,
    /// Only accept events for these location ids (404 otherwise). Repeatable; none = any.
    #[arg(long = "known-location", value_name = "LOCATION_ID")]
    pub known_locations: Vec<String>,
}

fn parse_register(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((id, path)) if !id.is_empty() && !path.is_empty() => {
            Ok((id.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("expected CLIENT_ID=PATH, got {s:?}")),
    }
}

/// Read one JWK or an array of JWKs.
fn read_jwks(path: &PathBuf) -> anyhow::Result<Vec<Jwk>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let keys = match value {
        serde_json::Value::Array(_) => serde_json::from_value::<Vec<Jwk>>(value),
        serde_json::Value::Object(ref o) if o.contains_key("keys") => {
            serde_json::from_value::<Vec<Jwk>>(value["keys"].clone())
        }
        _ => serde_json::from_value::<Jwk>(value).map(|k| vec![k]),
    }
    .with_context(|| format!("{} holds no valid JWK", path.display()))?;
    Ok(keys)
}

impl SimArgs {
    /// The simulator configuration these arguments describe.
    pub fn config(&self) -> SimConfig {
        SimConfig {
            bind: self.bind,
            api_audience: self.api_audience.clone(),
            partner_claim: self.partner_claim.clone(),
            token_lifetime: Duration::from_secs(self.token_lifetime_secs),
            rate_limit: (self.rate_limit_per_minute > 0).then_some(RateLimit {
                per_minute: self.rate_limit_per_minute,
                burst: self.burst,
            }),
            api_keys: self.api_keys.clone(),
            known_locations: (!self.known_locations.is_empty())
                .then(|| self.known_locations.clone()),
        }
    }
}

/// One accepted event as a stdout line.
fn event_line(r: &Received) -> String {
    let at =
        r.at.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
    serde_json::json!({
        "at": httpdate::fmt_http_date(r.at),
        "at_unix": at,
        "id": r.event_id,
        "client": r.client,
        "idempotency_key": r.idempotency_key,
        "trace_id": r.trace_id,
        "body": r.body,
    })
    .to_string()
}

/// Run the simulator until `shutdown` completes, printing to stdout.
pub async fn run_standalone(
    args: SimArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with_output(args, shutdown, &mut StdoutLines).await
}

/// `std::io::Stdout`, locked per write so lines never interleave.
struct StdoutLines;

impl Write for StdoutLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stdout().lock().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        std::io::stdout().lock().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// [`run_standalone`] with the start-up and event lines written to `out`.
pub async fn run_with_output(
    args: SimArgs,
    shutdown: impl std::future::Future<Output = ()>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut registrations = Vec::new();
    for (client, path) in &args.register {
        registrations.push((client.clone(), read_jwks(path)?));
    }
    let sim = Simulator::start(args.config())
        .await
        .context("starting the CHeKT simulator")?;
    for (client, keys) in registrations {
        let kids: Vec<String> = keys
            .iter()
            .filter_map(|k| k.common.key_id.clone())
            .collect();
        sim.register_client(&client, keys)
            .with_context(|| format!("registering client {client}"))?;
        tracing::info!(%client, ?kids, "simulator: client registered");
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let ca_path = args.out_dir.join("ca.pem");
    std::fs::write(&ca_path, sim.ca_pem())
        .with_context(|| format!("writing {}", ca_path.display()))?;

    let mut events = sim.subscribe();
    let banner = format!(
        "base_url={}\ntoken_url={}\nevents_url={}\ntenant_audience={}\nca_pem={}\n",
        sim.base_url(),
        sim.token_url(),
        sim.events_url(),
        sim.tenant_audience(),
        ca_path.display()
    );
    out.write_all(banner.as_bytes())?;
    out.flush()?;

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = events.recv() => match r {
                Ok(ev) => {
                    out.write_all(format!("{}\n", event_line(&ev)).as_bytes())?;
                    out.flush()?;
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "simulator: output fell behind; events not printed");
                }
                Err(RecvError::Closed) => break,
            },
        }
    }
    sim.shutdown().await;
    Ok(())
}
