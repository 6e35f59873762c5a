//! systemd integration: readiness, watchdog and status via `sd_notify`.
//!
//! Owns the notify socket protocol. Every call is a no-op when the agent is not started by
//! systemd (`NOTIFY_SOCKET` unset), so the same code runs in tests and on a bench.
//!
//! Invariant: `WATCHDOG=1` is sent only by the pipeline's supervisor after it checked that
//! every loop (MQTT, committer, uploader) turned recently — a wedged loop stops the pings
//! and systemd restarts the process.

use std::time::Duration;

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec))
    } else {
        None
    }
}

fn send(state: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

pub fn ready(status: &str) {
    send(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

pub fn watchdog(status: &str) {
    send(&[
        sd_notify::NotifyState::Watchdog,
        sd_notify::NotifyState::Status(status),
    ]);
}

pub fn status(status: &str) {
    send(&[sd_notify::NotifyState::Status(status)]);
}

pub fn reloading() {
    send(&[sd_notify::NotifyState::Reloading]);
}

pub fn stopping() {
    send(&[sd_notify::NotifyState::Stopping]);
}
