//! Ingest: takes messages from the site's MQTT broker and makes them durable in the spool
//! before acknowledging them.
//!
//! Two tasks:
//! - the **MQTT loop** owns rumqttc's event loop: persistent session (stable client id,
//!   clean session off), QoS 1 subscriptions to every topic-rule filter (one SUBSCRIBE per
//!   connection, its SUBACK checked: a filter the broker refuses is logged and raised as a
//!   `subscription_refused` trouble event, since no event on it can ever arrive), reconnects
//!   with exponential backoff, forwards each PUBLISH to the committer, and sends PUBACKs
//!   when the committer says a message is durable;
//! - the **committer** takes whatever messages are waiting (up to `spool.max_batch`),
//!   normalizes them, writes events and dead letters to the spool in one batch behind one
//!   fsync (group commit), and only then hands the PUBLISHes back for acknowledgement.
//!
//! Invariants:
//! - A PUBLISH is acknowledged only after its events (or its dead letter) are behind an
//!   fsync. If the agent dies before that, the broker redelivers it.
//! - Acknowledgements are sent in receipt order and only on the connection the message
//!   arrived on (a generation counter): a packet id from an old connection is never
//!   acknowledged on a new one.
//! - A redelivery (MQTT DUP) of a message that is already durable is acknowledged without
//!   being spooled again, and so is an event whose identity (e.g. a device `event_id`) was
//!   spooled recently; the spool remembers recent digests and identities for this.
//! - Nothing on this path panics on input; every undecodable message becomes a dead letter
//!   with its reason and original bytes.
//! - A batch whose commit failed is committed again as it was built (same events, same
//!   identities), never normalized afresh: a store failure can leave it half-visible (the
//!   uploader may already have sent some of it), and a new identity would send those events
//!   to CHeKT a second time under another `Idempotency-Key`.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event as MqttEvent, MqttOptions, Packet, Publish, QoS, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::MqttConfig;
use crate::normalize::{Inbound, Outcome, normalize};
use crate::site::SiteConfig;
use crate::spool::{DeadLetter, Spool};

/// Logged (info) when the broker answered the SUBSCRIBE of a connection; from then on it
/// keeps this client's messages in its persistent session.
pub const SUBSCRIBED_LOG: &str = "the broker answered the subscriptions";

/// Largest MQTT packet accepted from the broker.
pub const MAX_PACKET: usize = 256 * 1024;

/// A message received on connection generation `gen`.
pub struct Received {
    pub generation: u64,
    pub publish: Publish,
}

/// Messages now durable, to acknowledge on connection generation `gen`.
pub struct Durable {
    pub generation: u64,
    pub publishes: Vec<Publish>,
}

/// Counters for status lines and tests.
#[derive(Debug, Default)]
pub struct IngestStats {
    pub received: AtomicU64,
    pub spooled_events: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub ignored: AtomicU64,
    pub redeliveries_skipped: AtomicU64,
    /// Events not spooled because one with the same identity was spooled recently.
    pub duplicates_skipped: AtomicU64,
    pub commits: AtomicU64,
    pub connected: AtomicBool,
    /// The broker answered this connection's SUBSCRIBE (each filter granted or refused).
    pub subscribed: AtomicBool,
    /// Filters the broker refused on this connection.
    pub subscriptions_refused: AtomicU64,
}

/// What both ingest loops share: counters, their heartbeat, the clock.
#[derive(Clone)]
pub struct LoopCtx {
    pub stats: Arc<IngestStats>,
    pub heartbeat: Arc<AtomicI64>,
    pub clock: Arc<Clock>,
}

/// Shared, swappable site configuration (SIGHUP replaces it).
pub type SharedSite = Arc<RwLock<Arc<SiteConfig>>>;

/// The site configuration in force now (a poisoned lock still holds a whole one).
pub fn current_site(site: &SharedSite) -> Arc<SiteConfig> {
    site.read()
        .map(|s| s.clone())
        .unwrap_or_else(|p| p.into_inner().clone())
}

pub fn mqtt_options(cfg: &MqttConfig) -> MqttOptions {
    let mut o = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    o.set_keep_alive(cfg.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(cfg.max_inflight)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_request_channel_capacity(4096);
    if let Some((u, p)) = &cfg.credentials {
        o.set_credentials(u, &p.0);
    }
    o
}

/// The MQTT loop. Runs until `shutdown`; then disconnects (unacknowledged messages stay
/// with the broker for the next session).
pub async fn mqtt_loop(
    cfg: MqttConfig,
    site: SharedSite,
    to_commit: mpsc::Sender<Received>,
    mut durable: mpsc::UnboundedReceiver<Durable>,
    spool: Arc<Spool>,
    ctx: LoopCtx,
    shutdown: CancellationToken,
) {
    let LoopCtx {
        stats,
        heartbeat,
        clock,
    } = ctx;
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&cfg), 4096);
    let mut generation: u64 = 0;
    let mut backoff = Duration::from_millis(200);
    let mut pending_acks: std::collections::VecDeque<Publish> = Default::default();
    // The filters of this connection's SUBSCRIBE, in order, and the refused set last raised
    // as a trouble event (raised again only when it changes).
    let mut subscribing: Vec<String> = Vec::new();
    let mut refused_raised: Vec<String> = Vec::new();
    loop {
        heartbeat.store(clock.local_ms(), Ordering::Relaxed);
        // Acks queue into rumqttc's request channel; the event loop sends them on its
        // next turn. A channel that is full just means: try again after that turn.
        while let Some(p) = pending_acks.front() {
            if client.try_ack(p).is_err() {
                break;
            }
            pending_acks.pop_front();
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(d) = durable.recv() => {
                if d.generation == generation {
                    pending_acks.extend(d.publishes);
                } else {
                    tracing::debug!(n = d.publishes.len(), "acks for an old connection dropped; the broker redelivers those messages");
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                    backoff = Duration::from_millis(200);
                    stats.connected.store(true, Ordering::Relaxed);
                    stats.subscribed.store(false, Ordering::Relaxed);
                    subscribing = site.read().map(|s| s.filters()).unwrap_or_default();
                    tracing::info!(host = %cfg.host, port = cfg.port, session_present = ack.session_present, filters = ?subscribing, "connected to MQTT broker");
                    let all = subscribing.iter().map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    if let Err(e) = client.try_subscribe_many(all) {
                        tracing::error!(filters = ?subscribing, error = %e, "cannot subscribe");
                    }
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(ack))) => {
                    let refused = check_suback(&subscribing, &ack.return_codes);
                    tracing::info!(filters = subscribing.len(), refused = refused.len(), "{SUBSCRIBED_LOG}");
                    stats.subscriptions_refused.store(refused.len() as u64, Ordering::Relaxed);
                    stats.subscribed.store(true, Ordering::Relaxed);
                    if !refused.is_empty() && refused != refused_raised {
                        raise_refused(&spool, &site, &clock, &refused);
                        refused_raised = refused;
                    }
                }
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    let r = Received { generation, publish: p };
                    tokio::select! {
                        res = to_commit.send(r) => if res.is_err() { break },
                        _ = shutdown.cancelled() => break,
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    stats.connected.store(false, Ordering::Relaxed);
                    stats.subscribed.store(false, Ordering::Relaxed);
                    generation += 1;
                    pending_acks.clear();
                    tracing::warn!(host = %cfg.host, port = cfg.port, error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection lost or refused");
                    let until = tokio::time::Instant::now() + backoff;
                    while tokio::time::Instant::now() < until {
                        heartbeat.store(clock.local_ms(), Ordering::Relaxed);
                        tokio::select! {
                            _ = tokio::time::sleep((until - tokio::time::Instant::now()).min(Duration::from_secs(1))) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                    backoff = (backoff * 2).min(cfg.reconnect_max);
                }
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    // Send what is already durable, then say goodbye.
    for p in pending_acks.drain(..) {
        let _ = client.try_ack(&p);
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                _ => {}
            }
        }
    })
    .await;
    stats.connected.store(false, Ordering::Relaxed);
    stats.subscribed.store(false, Ordering::Relaxed);
}

/// Log what the broker granted for each filter of one SUBSCRIBE; return the refused ones.
fn check_suback(filters: &[String], codes: &[SubscribeReasonCode]) -> Vec<String> {
    if codes.len() != filters.len() {
        tracing::warn!(filters = ?filters, codes = ?codes, "SUBACK does not match the SUBSCRIBE");
    }
    let mut refused = Vec::new();
    for (f, code) in filters.iter().zip(codes) {
        match code {
            SubscribeReasonCode::Failure => {
                tracing::error!(filter = %f, "the broker refused the subscription: no event on this filter can arrive; allow this client to read it in the broker's ACL");
                refused.push(f.clone());
            }
            SubscribeReasonCode::Success(QoS::AtMostOnce) => {
                tracing::warn!(filter = %f, "the broker granted QoS 0 only: it will not redeliver a message the agent did not acknowledge");
            }
            SubscribeReasonCode::Success(_) => {
                tracing::debug!(filter = %f, "subscribed");
            }
        }
    }
    refused
}

/// Raise `subscription_refused` as a trouble event, so CHeKT learns that this site's
/// events on those filters cannot arrive.
fn raise_refused(spool: &Spool, site: &SharedSite, clock: &Clock, refused: &[String]) {
    let raised = crate::pipeline::raise_trouble(
        spool,
        &current_site(site),
        clock.now_ms(),
        "subscription_refused",
        format!(
            "the site's MQTT broker refused the agent's subscription to {}: events published there cannot reach CHeKT",
            refused.join(", ")
        ),
    );
    match raised {
        Ok(()) => {
            tracing::error!(filters = ?refused, "raised a subscription_refused trouble event")
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot record the subscription_refused trouble event")
        }
    }
}

/// Digest of a message, for redelivery detection.
pub fn message_digest(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(topic.len() as u64).to_be_bytes());
    ctx.update(topic.as_bytes());
    ctx.update(payload);
    ctx.finish().as_ref()[..16].to_vec()
}

/// The committer: normalize + group commit. Ends when the MQTT loop has ended and every
/// message it forwarded was committed, or could not be (then they stay unacknowledged).
pub async fn committer(
    spool: Arc<Spool>,
    site: SharedSite,
    mut from_mqtt: mpsc::Receiver<Received>,
    durable: mpsc::UnboundedSender<Durable>,
    max_batch: usize,
    ctx: LoopCtx,
) {
    let LoopCtx {
        stats,
        heartbeat,
        clock,
    } = ctx;
    let mut buf: Vec<Received> = Vec::with_capacity(max_batch);
    // The batch built from `buf`, kept until it is committed.
    let mut prepared: Option<Prepared> = None;
    let mut retry = Duration::from_millis(100);
    let mut drops = DropReporter::default();
    loop {
        heartbeat.store(clock.local_ms(), Ordering::Relaxed);
        drops.flush_if_due(&spool, &site, &clock);
        if buf.is_empty() {
            tokio::select! {
                n = from_mqtt.recv_many(&mut buf, max_batch) => if n == 0 { return },
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        let site_now = current_site(&site);
        let result = match prepared.take() {
            Some(p) => Ok(p),
            None => prepare_batch(&spool, &site_now, &buf, &stats, &clock),
        }
        .and_then(|p| {
            let r = commit_prepared(&spool, &p, &stats);
            if r.is_err() {
                prepared = Some(p);
            }
            r
        });
        match result {
            Ok(dropped) => {
                drops.add(dropped);
                retry = Duration::from_millis(100);
                stats.commits.fetch_add(1, Ordering::Relaxed);
                // Group acknowledgements by connection generation, preserving order.
                let mut out: Vec<Durable> = Vec::new();
                for r in buf.drain(..) {
                    if r.publish.qos == QoS::AtMostOnce {
                        continue;
                    }
                    match out.last_mut() {
                        Some(d) if d.generation == r.generation => d.publishes.push(r.publish),
                        _ => out.push(Durable {
                            generation: r.generation,
                            publishes: vec![r.publish],
                        }),
                    }
                }
                for d in out {
                    let _ = durable.send(d);
                }
            }
            Err(e) => {
                // Not acknowledged: the broker keeps the messages. Keep the batch, retry;
                // at shutdown (the MQTT loop is gone) give up instead of holding it up.
                if from_mqtt.is_closed() {
                    tracing::warn!(error = %e, n = buf.len(), "stopping with messages that could not be made durable; not acknowledged, the broker redelivers them");
                    return;
                }
                tracing::error!(error = %e, n = buf.len(), retry_in_ms = retry.as_millis() as u64, "cannot make messages durable; not acknowledging them");
                // Sleep in slices so the watchdog sees a live loop (as the uploader does).
                let until = tokio::time::Instant::now() + retry;
                while tokio::time::Instant::now() < until {
                    heartbeat.store(clock.local_ms(), Ordering::Relaxed);
                    tokio::time::sleep(
                        (until - tokio::time::Instant::now()).min(Duration::from_secs(1)),
                    )
                    .await;
                }
                retry = (retry * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// A normalized batch, ready to commit (again, after a failure).
struct Prepared {
    batch: crate::spool::Batch,
    events: u64,
    dead: u64,
}

fn prepare_batch(
    spool: &Spool,
    site: &SiteConfig,
    msgs: &[Received],
    stats: &IngestStats,
    clock: &Clock,
) -> Result<Prepared, crate::spool::SpoolError> {
    let mut batch = spool.batch();
    let mut events = 0u64;
    let mut dead = 0u64;
    let mut seen_in_batch: Vec<Vec<u8>> = Vec::new();
    for r in msgs {
        let p = &r.publish;
        let mut digest = vec![b'm'];
        digest.extend(message_digest(&p.topic, &p.payload));
        if p.dup && (seen_in_batch.contains(&digest) || spool.seen_recently(&digest)?) {
            stats.redeliveries_skipped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(topic = %p.topic, "redelivered message already spooled; acknowledging without spooling again");
            continue;
        }
        let now = clock.now_ms();
        let inbound = Inbound {
            topic: &p.topic,
            payload: &p.payload,
            received_at_ms: now,
            msg_id: spool.next_msg_id(),
        };
        match normalize(&inbound, site) {
            Ok(Outcome::Events(evs)) => {
                for e in &evs {
                    // An event whose identity was spooled recently (a device republishing
                    // the same `event_id`) is already on its way; a second copy would differ
                    // in `received_at` and earn a 409 from CHeKT.
                    let mut idkey = vec![b'e'];
                    idkey.extend_from_slice(e.id.as_bytes());
                    if seen_in_batch.contains(&idkey) || spool.seen_recently(&idkey)? {
                        stats.duplicates_skipped.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(event_id = %e.id, topic = %p.topic, "event already spooled recently (same identity); not sent twice");
                        continue;
                    }
                    spool.push_event(&mut batch, e)?;
                    spool.push_recent(&mut batch, &idkey);
                    seen_in_batch.push(idkey);
                    events += 1;
                }
            }
            Ok(Outcome::Ignored(why)) => {
                stats.ignored.fetch_add(1, Ordering::Relaxed);
                tracing::info!(topic = %p.topic, reason = %why, "message understood but not forwarded");
            }
            Err(reject) => {
                tracing::warn!(topic = %p.topic, reason = %reject, bytes = p.payload.len(), "undecodable message moved to dead letters");
                spool.push_dead(
                    &mut batch,
                    &DeadLetter {
                        at_ms: now,
                        stage: "normalize".into(),
                        reason: reject.to_string(),
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                        event: None,
                    },
                )?;
                dead += 1;
            }
        }
        spool.push_recent(&mut batch, &digest);
        seen_in_batch.push(digest);
    }
    Ok(Prepared {
        batch,
        events,
        dead,
    })
}

fn commit_prepared(
    spool: &Spool,
    p: &Prepared,
    stats: &IngestStats,
) -> Result<[u64; 4], crate::spool::SpoolError> {
    let report = spool.commit(p.batch.clone())?;
    stats.spooled_events.fetch_add(p.events, Ordering::Relaxed);
    stats.dead_lettered.fetch_add(p.dead, Ordering::Relaxed);
    if report.dropped.iter().any(|d| *d > 0) {
        tracing::error!(dropped = ?report.dropped, "spool byte budget exceeded: dropped the oldest events of the lowest classes");
    }
    Ok(report.dropped)
}

/// Turns evictions into at most one trouble event a minute, aggregated.
#[derive(Default)]
struct DropReporter {
    pending: [u64; 4],
    last: Option<tokio::time::Instant>,
}

impl DropReporter {
    const EVERY: Duration = Duration::from_secs(60);

    fn add(&mut self, dropped: [u64; 4]) {
        for (p, d) in self.pending.iter_mut().zip(dropped) {
            *p += d;
        }
    }

    fn flush_if_due(&mut self, spool: &Spool, site: &SharedSite, clock: &Clock) {
        if self.pending.iter().all(|d| *d == 0) {
            return;
        }
        if self.last.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        let [alarm, trouble, arming, other] = self.pending;
        let raised = crate::pipeline::raise_trouble(
            spool,
            &current_site(site),
            clock.now_ms(),
            "spool_overflow",
            format!(
                "event store full: dropped {alarm} alarm, {trouble} trouble, {arming} arming and {other} routine events (oldest of the lowest class first)"
            ),
        );
        match raised {
            Ok(()) => {
                tracing::error!(dropped = ?self.pending, "raised a spool_overflow trouble event");
                self.pending = [0; 4];
                self.last = Some(tokio::time::Instant::now());
            }
            Err(e) => tracing::error!(error = %e, "cannot record the spool_overflow trouble event"),
        }
    }
}
