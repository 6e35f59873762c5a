//! Pipeline: wires ingest -> normalize -> spool -> upload, supervises the loops, and stops
//! them in order.
//!
//! Owns: task start-up and shutdown order, the watchdog decision (all loops turned
//! recently), status lines, site-configuration reload, and the store-reset trouble event
//! (ingest raises the ones for events dropped for space and refused subscriptions).
//!
//! Shutdown (driven by a future or token, so tests drive it like SIGTERM does):
//! 1. stop taking messages: the MQTT loop disconnects; unacknowledged messages stay with
//!    the broker;
//! 2. the committer commits what it already received;
//! 3. the uploader finishes its in-flight request or abandons it after the grace period
//!    (the event stays spooled, resent later with the same `Idempotency-Key`);
//! 4. the spool is synced. Tasks that did not stop in time are named in the report.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenSource;
use crate::clock::Clock;
use crate::config::Config;
use crate::event::Event;
use crate::ingest::{self, IngestStats, SharedSite};
use crate::keys::KeyStore;
use crate::site::{SiteConfig, SiteError};
use crate::spool::{Reset, Spool, SpoolError};
use crate::upload::{self, UploadError, UploadStats, Uploader};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// A loop returned or panicked while the agent was running. The agent stops and exits
    /// with a failure status, so systemd (`Restart=on-failure`) starts it again.
    #[error(
        "the {task} loop ended unexpectedly (see the log above); exiting so the agent is restarted"
    )]
    LoopEnded { task: &'static str },
}

/// Options tests (and the demo) set; production uses the defaults.
#[derive(Clone, Default)]
pub struct Options {
    /// Clock to use (tests skew it to 1970).
    pub clock: Option<Arc<Clock>>,
    /// Key store to use instead of the configured key directory.
    pub keys: Option<KeyStore>,
    /// How long the in-flight request may finish at shutdown (default 5 s).
    pub grace: Option<Duration>,
}

/// A running pipeline.
pub struct Running {
    pub spool: Arc<Spool>,
    pub ingest: Arc<IngestStats>,
    pub upload: Arc<UploadStats>,
    pub tokens: Arc<TokenSource>,
    pub clock: Arc<Clock>,
    /// Set when the store was unreadable at start and replaced.
    pub reset: Option<Reset>,
    site: SharedSite,
    beats: [Arc<AtomicI64>; 3],
    stop_ingest: CancellationToken,
    stop_upload: CancellationToken,
    mqtt: JoinHandle<()>,
    committer: JoinHandle<()>,
    uploader: JoinHandle<Result<(), UploadError>>,
    grace: Duration,
}

/// What did not stop in time.
#[derive(Debug, Default)]
pub struct StopReport {
    pub not_stopped: Vec<&'static str>,
}

/// Store the agent's own trouble event `AGENT:<code>` for `site`, durably, like any event.
pub(crate) fn raise_trouble(
    spool: &Spool,
    site: &SiteConfig,
    now_ms: i64,
    code: &str,
    description: String,
) -> Result<(), SpoolError> {
    let ev = Event::agent_trouble(
        &site.location_id,
        site.recorder_id.as_deref(),
        now_ms,
        code,
        description,
    );
    let mut b = spool.batch();
    spool.push_event(&mut b, &ev)?;
    spool.commit(b).map(|_| ())
}

impl Running {
    /// Open the spool, build the HTTP client and token source, start every loop.
    pub async fn start(
        cfg: &Config,
        site: SiteConfig,
        opts: Options,
    ) -> Result<Running, PipelineError> {
        let clock = opts.clock.unwrap_or_else(|| Arc::new(Clock::system()));
        let (spool, reset) = Spool::open(&cfg.spool)?;
        let spool = Arc::new(spool);
        if let Some(r) = &reset {
            raise_trouble(
                &spool,
                &site,
                clock.now_ms(),
                "spool_reset",
                format!(
                    "event store was unreadable at start ({}); set aside at {} and a fresh one started",
                    r.error,
                    r.moved_to.display()
                ),
            )?;
        }
        let http = upload::http_client(&cfg.chekt)?;
        let mut tokens = TokenSource::new(&cfg.chekt.auth, http.clone(), clock.clone());
        if let Some(k) = opts.keys {
            tokens = tokens.with_key_store(k);
        }
        if tokens.is_api_key() {
            tracing::warn!(
                "authenticating with a static API key: the bring-up tier; switch to assertion tokens (chekt.auth = \"assertion\") for production"
            );
        }
        let tokens = Arc::new(tokens);
        let ingest_stats = Arc::new(IngestStats::default());
        let upload_stats = Arc::new(UploadStats::default());
        let site: SharedSite = Arc::new(RwLock::new(Arc::new(site)));
        let beats = [
            Arc::new(AtomicI64::new(clock.local_ms())),
            Arc::new(AtomicI64::new(clock.local_ms())),
            Arc::new(AtomicI64::new(clock.local_ms())),
        ];
        let stop_ingest = CancellationToken::new();
        let stop_upload = CancellationToken::new();
        let (to_commit, from_mqtt) = mpsc::channel(cfg.spool.max_batch * 2);
        let (durable_tx, durable_rx) = mpsc::unbounded_channel();
        let mqtt = tokio::spawn(ingest::mqtt_loop(
            cfg.mqtt.clone(),
            site.clone(),
            to_commit,
            durable_rx,
            spool.clone(),
            ingest::LoopCtx {
                stats: ingest_stats.clone(),
                heartbeat: beats[0].clone(),
                clock: clock.clone(),
            },
            stop_ingest.clone(),
        ));
        let committer = tokio::spawn(ingest::committer(
            spool.clone(),
            site.clone(),
            from_mqtt,
            durable_tx,
            cfg.spool.max_batch,
            ingest::LoopCtx {
                stats: ingest_stats.clone(),
                heartbeat: beats[1].clone(),
                clock: clock.clone(),
            },
        ));
        let grace = opts.grace.unwrap_or(Duration::from_secs(5));
        let uploader = tokio::spawn(
            Uploader {
                spool: spool.clone(),
                tokens: tokens.clone(),
                http,
                cfg: cfg.chekt.clone(),
                clock: clock.clone(),
                stats: upload_stats.clone(),
                heartbeat: beats[2].clone(),
                grace,
            }
            .run(stop_upload.clone()),
        );
        Ok(Running {
            spool,
            ingest: ingest_stats,
            upload: upload_stats,
            tokens,
            clock,
            reset,
            site,
            beats,
            stop_ingest,
            stop_upload,
            mqtt,
            committer,
            uploader,
            grace,
        })
    }

    /// Names of loops that have not turned within `stale`.
    pub fn stalled(&self, stale: Duration) -> Vec<&'static str> {
        let now = self.clock.local_ms();
        let names = ["mqtt", "committer", "uploader"];
        self.beats
            .iter()
            .zip(names)
            .filter(|(b, _)| now - b.load(Ordering::Relaxed) > stale.as_millis() as i64)
            .map(|(_, n)| n)
            .collect()
    }

    /// One line for `STATUS=` and logs.
    pub fn status_line(&self) -> String {
        let s = self.spool.stats();
        let last = self.upload.last_delivery_ms.load(Ordering::Relaxed);
        let last = if last == 0 {
            "never".to_string()
        } else {
            format!("{} s ago", (self.clock.now_ms() - last).max(0) / 1000)
        };
        format!(
            "backlog {} (alarm {}, trouble {}, arming {}, other {}), delivered {}, last delivery {}, dead letters {}, dropped {}, broker {}",
            s.backlog(),
            s.queued[0],
            s.queued[1],
            s.queued[2],
            s.queued[3],
            self.upload.delivered.load(Ordering::Relaxed),
            last,
            s.dead_letters,
            s.dropped.iter().sum::<u64>(),
            self.broker_state(),
        )
    }

    fn broker_state(&self) -> String {
        let i = &self.ingest;
        if !i.connected.load(Ordering::Relaxed) {
            return "disconnected".into();
        }
        if !i.subscribed.load(Ordering::Relaxed) {
            return "connected, subscribing".into();
        }
        match i.subscriptions_refused.load(Ordering::Relaxed) {
            0 => "connected, subscribed".into(),
            n => format!("connected, {n} subscription(s) REFUSED by the broker"),
        }
    }

    pub fn site(&self) -> Arc<SiteConfig> {
        ingest::current_site(&self.site)
    }

    /// Re-read the site file. On error the running configuration is kept. Changed topic
    /// filters take effect at the next broker connection.
    pub fn reload_site(&self, path: &Path) -> Result<(), SiteError> {
        let new = SiteConfig::load(path)?;
        match self.site.write() {
            Ok(mut g) => *g = Arc::new(new),
            Err(p) => *p.into_inner() = Arc::new(new),
        }
        Ok(())
    }

    /// Stop in order (see module doc). Waits at most about `grace` + 3 s.
    pub async fn stop(self) -> StopReport {
        let mut report = StopReport::default();
        self.stop_ingest.cancel();
        if tokio::time::timeout(Duration::from_secs(2), self.mqtt)
            .await
            .is_err()
        {
            report.not_stopped.push("mqtt");
        }
        if tokio::time::timeout(Duration::from_secs(2), self.committer)
            .await
            .is_err()
        {
            report.not_stopped.push("committer");
        }
        self.stop_upload.cancel();
        match tokio::time::timeout(self.grace + Duration::from_secs(1), self.uploader).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "uploader ended with an error"),
            Ok(_) => {}
            Err(_) => report.not_stopped.push("uploader"),
        }
        if let Err(e) = self.spool.sync() {
            tracing::error!(error = %e, "final spool sync failed");
        }
        report
    }

    /// True when a loop ended by itself (it should only end at shutdown).
    pub fn task_died(&self) -> Option<&'static str> {
        if self.mqtt.is_finished() {
            Some("mqtt")
        } else if self.committer.is_finished() {
            Some("committer")
        } else if self.uploader.is_finished() {
            Some("uploader")
        } else {
            None
        }
    }
}

/// Run until `shutdown` resolves: readiness, watchdog, status, SIGHUP reloads (`reload`).
pub async fn run(
    cfg: &Config,
    site: SiteConfig,
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
    mut reload: mpsc::Receiver<()>,
) -> Result<StopReport, PipelineError> {
    let running = Running::start(cfg, site, opts).await?;
    tracing::info!(status = %running.status_line(), "agent running");
    crate::systemd::ready(&running.status_line());
    let wd = crate::systemd::watchdog_interval();
    let tick = wd
        .map(|w| w / 2)
        .unwrap_or(Duration::from_secs(10))
        .max(Duration::from_millis(100));
    let stale = wd
        .unwrap_or(Duration::from_secs(30))
        .max(Duration::from_secs(3));
    let mut ticker = tokio::time::interval(tick);
    let mut last_status_log = tokio::time::Instant::now();
    let mut died = None;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(()) = reload.recv() => {
                crate::systemd::reloading();
                match running.reload_site(&cfg.site_file) {
                    Ok(()) => tracing::info!(file = %cfg.site_file.display(), "site configuration reloaded"),
                    Err(e) => tracing::error!(error = %e, "site configuration NOT reloaded; keeping the previous one"),
                }
                crate::systemd::ready(&running.status_line());
            }
            _ = ticker.tick() => {
                if let Some(dead) = running.task_died() {
                    tracing::error!(task = dead, "a pipeline loop ended unexpectedly; stopping so systemd restarts the agent");
                    died = Some(dead);
                    break;
                }
                let stalled = running.stalled(stale);
                let line = running.status_line();
                if stalled.is_empty() {
                    if wd.is_some() {
                        crate::systemd::watchdog(&line);
                    } else {
                        crate::systemd::status(&line);
                    }
                } else {
                    tracing::error!(stalled = ?stalled, "pipeline loop(s) not making progress; withholding the watchdog ping");
                    crate::systemd::status(&format!("STALLED: {stalled:?}; {line}"));
                }
                if last_status_log.elapsed() >= Duration::from_secs(60) {
                    tracing::info!(status = %line, "status");
                    last_status_log = tokio::time::Instant::now();
                }
            }
        }
    }
    crate::systemd::stopping();
    tracing::info!("stopping: no new messages taken; finishing in-flight work");
    let report = running.stop().await;
    if report.not_stopped.is_empty() {
        tracing::info!("stopped cleanly; spool synced");
    } else {
        tracing::error!(not_stopped = ?report.not_stopped, "these did not stop within the grace period");
    }
    match died {
        Some(task) => Err(PipelineError::LoopEnded { task }),
        None => Ok(report),
    }
}
