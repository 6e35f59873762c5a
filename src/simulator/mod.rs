//! The CHeKT simulator: an HTTPS server that plays CHeKT's Auth0 token endpoint and Partner
//! Event API as the shared CHeKT contract describes them, for the crate's integration tests
//! (in process, [`Simulator::start`]) and for partners (standalone, [`run_standalone`]).
//!
//! This file owns the public API (configuration, the [`Simulator`] handle, the records it
//! exposes) and the network life cycle: a fresh test CA and `localhost` certificate per start
//! (`tls`), one accept loop, one task per connection, HTTP/1.1 with keep-alive via hyper.
//! Request handling lives in `http` (routing, envelopes, `Date`), `token` (the assertion
//! checks), `events` (auth, rate limit, idempotency, validation) and `faults`.
//!
//! Invariants: every response carries exactly one `Date` header, taken from the simulator's
//! clock (system time + [`Simulator::set_clock_offset`]), and an `x-request-id`. During an
//! outage the listening socket is closed — new connections are refused — and live keep-alive
//! connections are dropped; a request that still reaches one is reset, never answered.
//! Leaving the outage rebinds the same port. All shared state sits
//! behind one `std::sync::Mutex` that is never held across an `.await`. Assertions are
//! verified only with the registered public JWKs, through `jsonwebtoken::decode` and the
//! ring provider of `crate::jwt`.

mod events;
mod faults;
mod http;
mod standalone;
mod state;
mod tls;
mod token;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

pub use faults::Faults;
pub use standalone::{SimArgs, run_standalone, run_with_output};

use state::Shared;

/// Default `audience` form parameter the token endpoint expects (CHeKT's sandbox API).
pub const DEFAULT_API_AUDIENCE: &str = "https://adc-m2m.chektdev.com/";
/// Default name of the form parameter carrying the partner claim (a JSON string).
pub const DEFAULT_PARTNER_CLAIM: &str = "https://api.chektdev.com/claims/partner";
/// Path of the token endpoint.
pub const TOKEN_PATH: &str = "/oauth/token";
/// Path of the event ingestion endpoint.
pub const EVENTS_PATH: &str = "/partner/v1/events";

/// A token bucket per app: `burst` requests at once, refilled at `per_minute / 60` per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
}

impl RateLimit {
    /// CHeKT's Free tier: 60 req/min, burst 5.
    pub const FREE: RateLimit = RateLimit {
        per_minute: 60,
        burst: 5,
    };
    /// CHeKT's Pro tier: 600 req/min, burst 30.
    pub const PRO: RateLimit = RateLimit {
        per_minute: 600,
        burst: 30,
    };
    /// CHeKT's Enterprise tier: 3,000 req/min, burst 200.
    pub const ENTERPRISE: RateLimit = RateLimit {
        per_minute: 3000,
        burst: 200,
    };
}

/// What the simulator expects and how it limits.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Listening address; port 0 picks a free port (kept across outages).
    pub bind: SocketAddr,
    /// The `audience` form parameter the token endpoint requires.
    pub api_audience: String,
    /// Name of the optional partner-claim form parameter (value: a JSON object as a string).
    pub partner_claim: String,
    /// `expires_in` of issued access tokens.
    pub token_lifetime: Duration,
    /// Per-app token bucket on the event endpoint; `None` (or `per_minute == 0`) = off.
    pub rate_limit: Option<RateLimit>,
    /// Static API keys accepted as bearer tokens; the key itself is the app id.
    pub api_keys: Vec<String>,
    /// If set, events for any other `location_id` are answered 404 `location_not_found`.
    pub known_locations: Option<Vec<String>>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_audience: DEFAULT_API_AUDIENCE.to_string(),
            partner_claim: DEFAULT_PARTNER_CLAIM.to_string(),
            token_lifetime: Duration::from_secs(3600),
            rate_limit: Some(RateLimit::PRO),
            api_keys: Vec::new(),
            known_locations: None,
        }
    }
}

/// One accepted event (first acceptance of its idempotency key).
#[derive(Clone, Debug)]
pub struct Received {
    pub idempotency_key: String,
    /// The request body as parsed JSON.
    pub body: serde_json::Value,
    /// The app that posted it: the client_id of the access token, or the API key.
    pub client: String,
    /// `x-partner-trace-id` of the accepting request.
    pub trace_id: Option<String>,
    /// Simulator-clock time of acceptance.
    pub at: SystemTime,
    /// Times this key was posted and answered 2xx, including replays. A first acceptance
    /// answered 500 by the `lost_response` fault counts 0.
    pub deliveries: u32,
    /// The `id` ("evt_...") the simulator assigned.
    pub event_id: String,
}

/// One media upload (`PUT` to an upload URL handed out with an accepted event).
#[derive(Clone, Debug)]
pub struct Upload {
    pub event_id: String,
    /// `snapshot.jpg` or `clip.mp4`.
    pub name: String,
    pub content_type: Option<String>,
    pub bytes: usize,
    pub at: SystemTime,
}

/// Counters, all monotonic since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Access tokens issued.
    pub token_ok: u64,
    /// Token requests refused (any 4xx from the token endpoint).
    pub token_rejected: u64,
    /// Events stored on first acceptance (including those whose 201 the `lost_response`
    /// fault replaced with a 500).
    pub events_accepted: u64,
    /// Idempotent replays answered.
    pub events_replayed: u64,
    pub conflicts_409: u64,
    pub unauthorized_401: u64,
    /// 429s from the bucket and from `rate_limit_storm`.
    pub rate_limited_429: u64,
    pub validation_422: u64,
    /// 400s from the event endpoint (missing/invalid Idempotency-Key, malformed JSON).
    pub bad_request_400: u64,
    /// 404s: unknown path, unknown location, unknown upload target.
    pub not_found_404: u64,
    /// Faults acted on: resets, stalls, storms, injected error statuses, lost responses,
    /// token endpoint 503s. Latency is not counted.
    pub injected_faults: u64,
    /// Connections dropped by the `reset_rate` fault.
    pub resets: u64,
    /// Requests delayed by the `stall_rate` fault.
    pub stalls: u64,
    /// Accepted events answered 500 by the `lost_response_rate` fault.
    pub lost_responses: u64,
    /// Media uploads accepted.
    pub uploads: u64,
}

/// Errors of starting, configuring and running the simulator.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client {client:?}: {count} keys registered, Auth0 allows at most 2")]
    TooManyKeys { client: String, count: usize },
    #[error("client {client:?}: every JWK needs a kid")]
    MissingKid { client: String },
    #[error("client {client:?}: kid {kid:?} registered twice")]
    DuplicateKid { client: String, kid: String },
    #[error("client {client:?}, kid {kid:?}: {reason}")]
    BadKey {
        client: String,
        kid: String,
        reason: String,
    },
    #[error("invalid client_id {0:?}: 1..=64 characters")]
    BadClientId(String),
    #[error("the simulator has been shut down")]
    ShutDown,
}

/// Network plumbing shared by the handle, the accept loop and the connection tasks.
struct Net {
    /// The listening socket; `None` during an outage or after shutdown. Taken out and dropped
    /// synchronously, so the port refuses connections as soon as `set_outage(true)` returns.
    listener: Mutex<Option<TcpListener>>,
    /// The address actually bound (port resolved), rebound after an outage.
    addr: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    /// Bumped whenever `listener` is replaced, to wake the accept loop.
    listener_gen: watch::Sender<u64>,
    /// Bumped to drop every live connection (outage on, shutdown).
    kill_conns: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    /// Outage or shutdown: shared with every connection, whose handler then resets the
    /// connection instead of answering (closes the race with a request already on the wire).
    down: Arc<AtomicBool>,
    stopped: AtomicBool,
}

impl Net {
    fn listener(&self) -> std::sync::MutexGuard<'_, Option<TcpListener>> {
        self.listener.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kill_connections(&self) {
        self.kill_conns.send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// A running simulator. Dropping it stops the server (as [`Simulator::shutdown`] does, without
/// waiting).
pub struct Simulator {
    shared: Arc<Shared>,
    net: Arc<Net>,
    tls: tls::TestPki,
    runtime: tokio::runtime::Handle,
    accept_task: Option<JoinHandle<()>>,
}

/// Bind `addr` with std (which sets SO_REUSEADDR on Unix, so the same port can be rebound
/// right after an outage) and hand it to tokio.
fn bind(addr: SocketAddr) -> Result<TcpListener, SimError> {
    let std_listener =
        std::net::TcpListener::bind(addr).map_err(|source| SimError::Bind { addr, source })?;
    std_listener.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std_listener)?)
}

impl Simulator {
    /// Generate the PKI, bind, and start serving. Must be called inside a tokio runtime.
    pub async fn start(cfg: SimConfig) -> Result<Simulator, SimError> {
        crate::jwt::install();
        let listener = bind(cfg.bind)?;
        let addr = listener.local_addr()?;
        let tls = tls::TestPki::generate()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls.server_config()?));
        let base_url = format!("https://localhost:{}", addr.port());
        let shared = Arc::new(Shared::new(cfg, base_url));
        let net = Arc::new(Net {
            listener: Mutex::new(Some(listener)),
            addr,
            acceptor,
            listener_gen: watch::Sender::new(0),
            kill_conns: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            down: Arc::new(AtomicBool::new(false)),
            stopped: AtomicBool::new(false),
        });
        let accept_task = tokio::spawn(accept_loop(shared.clone(), net.clone()));
        tracing::info!(addr = %addr, base = %shared.base_url, "CHeKT simulator listening");
        Ok(Simulator {
            shared,
            net,
            tls,
            runtime: tokio::runtime::Handle::current(),
            accept_task: Some(accept_task),
        })
    }

    /// `https://localhost:PORT`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// `base_url() + "/oauth/token"`.
    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.shared.base_url)
    }

    /// `base_url() + "/partner/v1/events"`.
    pub fn events_url(&self) -> String {
        format!("{}{EVENTS_PATH}", self.shared.base_url)
    }

    /// What an assertion's `aud` must equal: `base_url() + "/"`.
    pub fn tenant_audience(&self) -> String {
        self.shared.tenant_audience.clone()
    }

    /// The socket address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.net.addr
    }

    /// PEM of the test CA that signed the server certificate (fresh per start).
    pub fn ca_pem(&self) -> String {
        self.tls.ca_pem.clone()
    }

    /// DER of the test CA certificate.
    pub fn ca_der(&self) -> Vec<u8> {
        self.tls.ca_der.clone()
    }

    /// A rustls client configuration (ring provider, this CA as the only root) for
    /// `reqwest::ClientBuilder::tls_backend_preconfigured`; needs no process-default provider.
    pub fn client_tls_config(&self) -> rustls::ClientConfig {
        self.tls.client_config()
    }

    /// A reqwest client that trusts this simulator's CA (and nothing else).
    pub fn http_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_backend_preconfigured(self.client_tls_config())
            .build()
            .expect("reqwest client with a preconfigured rustls config")
    }

    /// Replace `client_id`'s key set. At most 2 keys (Auth0's limit), each with a unique
    /// `kid`, RSA (>= 2048 bit) or EC P-256, and an `alg` (if any) from the allow-list that
    /// fits the key type.
    pub fn register_client(
        &self,
        client_id: &str,
        jwks: Vec<jsonwebtoken::jwk::Jwk>,
    ) -> Result<(), SimError> {
        token::check_registration(client_id, &jwks)?;
        self.shared
            .lock()
            .clients
            .insert(client_id.to_string(), jwks);
        Ok(())
    }

    /// Replace the fault plan.
    pub fn set_faults(&self, f: Faults) {
        *self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()) = f;
    }

    /// `true`: close the listening socket (connections refused) and drop live connections
    /// (a request racing onto one is reset, never answered; no request is processed).
    /// `false`: rebind the same port and serve again. Errors (port taken meanwhile) are logged;
    /// see [`Simulator::try_set_outage`].
    pub fn set_outage(&self, on: bool) {
        if let Err(e) = self.try_set_outage(on) {
            tracing::error!(error = %e, "simulator: cannot leave outage");
        }
    }

    /// [`Simulator::set_outage`], reporting a failed rebind.
    pub fn try_set_outage(&self, on: bool) -> Result<(), SimError> {
        if self.net.stopped.load(Ordering::SeqCst) {
            return Err(SimError::ShutDown);
        }
        if on {
            self.net.down.store(true, Ordering::SeqCst);
            drop(self.net.listener().take());
            self.net.kill_connections();
            tracing::info!("simulator: outage on");
        } else {
            let mut slot = self.net.listener();
            if slot.is_none() {
                let _rt = self.runtime.enter();
                *slot = Some(bind(self.net.addr)?);
            }
            drop(slot);
            self.net.down.store(false, Ordering::SeqCst);
            self.net
                .listener_gen
                .send_modify(|g| *g = g.wrapping_add(1));
            tracing::info!("simulator: outage off");
        }
        Ok(())
    }

    /// The simulator's clock = system time + `secs`.
    pub fn set_clock_offset(&self, secs: i64) {
        self.shared.clock.set_offset(secs);
    }

    /// The simulator's current time.
    pub fn now(&self) -> SystemTime {
        self.shared.clock.now()
    }

    /// Accepted events in acceptance order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().received.clone()
    }

    /// Every event accepted from now on (first acceptances only).
    pub fn subscribe(&self) -> broadcast::Receiver<Received> {
        self.shared.received_tx.subscribe()
    }

    /// Media uploads received.
    pub fn uploads(&self) -> Vec<Upload> {
        self.shared.lock().uploads.clone()
    }

    pub fn stats(&self) -> Stats {
        self.shared.lock().stats.clone()
    }

    /// Access tokens issued, per `kid` of the assertion that obtained them.
    pub fn tokens_by_kid(&self) -> HashMap<String, u64> {
        self.shared.lock().tokens_by_kid.clone()
    }

    /// Make every access token issued so far expired now.
    pub fn expire_tokens(&self) {
        for t in self.shared.lock().tokens.values_mut() {
            t.revoked = true;
        }
    }

    /// Stop accepting, drop live connections and wait for the accept loop to end.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(task) = self.accept_task.take() {
            let _ = task.await;
        }
    }

    fn stop(&self) {
        self.net.stopped.store(true, Ordering::SeqCst);
        self.net.down.store(true, Ordering::SeqCst);
        drop(self.net.listener().take());
        self.net.shutdown.send_replace(true);
        self.net.kill_connections();
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Poll the current listener, if any: `None` means "no listener now" (outage).
fn poll_accept(
    net: &Net,
    cx: &mut std::task::Context<'_>,
) -> Poll<Option<std::io::Result<(tokio::net::TcpStream, SocketAddr)>>> {
    match net.listener().as_ref() {
        Some(l) => l.poll_accept(cx).map(Some),
        None => Poll::Ready(None),
    }
}

async fn accept_loop(shared: Arc<Shared>, net: Arc<Net>) {
    let mut gen_rx = net.listener_gen.subscribe();
    let mut shutdown_rx = net.shutdown.subscribe();
    loop {
        if *shutdown_rx.borrow_and_update() {
            break;
        }
        let accepted = tokio::select! {
            biased;
            _ = shutdown_rx.changed() => break,
            _ = gen_rx.changed() => continue,
            r = poll_fn(|cx| poll_accept(&net, cx)) => r,
        };
        match accepted {
            None => {
                // Outage: wait for a new listener (or shutdown).
                tokio::select! {
                    _ = shutdown_rx.changed() => break,
                    _ = gen_rx.changed() => {}
                }
            }
            Some(Ok((tcp, peer))) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(serve_connection(shared.clone(), net.clone(), tcp, peer));
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "simulator: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tracing::debug!("simulator: accept loop ended");
}

async fn serve_connection(
    shared: Arc<Shared>,
    net: Arc<Net>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let mut kill = net.kill_conns.subscribe();
    kill.borrow_and_update();
    if net.down.load(Ordering::SeqCst) {
        return;
    }
    let conn = Arc::new(http::ConnCtx {
        reset: Arc::new(AtomicBool::new(false)),
        down: net.down.clone(),
    });
    let io = http::ResettableTcp::new(tcp, conn.reset.clone());
    let tls = tokio::select! {
        biased;
        _ = kill.changed() => return,
        r = tokio::time::timeout(Duration::from_secs(10), net.acceptor.accept(io)) => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "simulator: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "simulator: TLS handshake timed out");
                return;
            }
        },
    };
    let svc =
        hyper::service::service_fn(move |req| http::handle(shared.clone(), conn.clone(), req));
    let mut builder = http1::Builder::new();
    builder
        .keep_alive(true)
        .auto_date_header(false)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(60));
    let serving = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::select! {
        biased;
        _ = kill.changed() => {
            tracing::debug!(%peer, "simulator: connection dropped (outage/shutdown)");
        }
        r = serving => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "simulator: connection ended");
            }
        }
    }
}
