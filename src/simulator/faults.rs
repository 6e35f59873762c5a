//! The fault plan ([`Faults`]) and the draws that act on it.
//!
//! Invariants: every probability is drawn independently per request from ring's
//! `SystemRandom` (no seeded generator: tests use rates of 0 or 1 when they need certainty).
//! On `POST /partner/v1/events` the faults apply in a fixed order before any processing —
//! reset, stall, latency, rate-limit storm, error status — and `lost_response_rate` applies
//! after the event was stored. The token endpoint only knows `token_error_rate`. An outage is
//! not a fault here: it closes the listener (see `Simulator::set_outage`).

use std::time::Duration;

use super::state::Shared;

/// What to break, and how often. `Default` breaks nothing.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// `(status, probability)`: answer that status (CHeKT error envelope) before processing.
    /// One uniform draw per request is compared with the running sum of probabilities.
    pub error_rates: Vec<(u16, f64)>,
    /// Process and store the event, then answer 500 anyway (tests idempotent retry).
    pub lost_response_rate: f64,
    /// Drop the TCP connection (RST) without any response.
    pub reset_rate: f64,
    /// Added before answering an event POST.
    pub latency: Duration,
    /// With this probability, sleep `stall` before processing (client timeout tests).
    pub stall_rate: f64,
    pub stall: Duration,
    /// `Some(n)`: answer every event POST 429 with `Retry-After: n` (seconds).
    pub rate_limit_storm: Option<u64>,
    /// The token endpoint answers 503 with this probability.
    pub token_error_rate: f64,
}

impl Faults {
    /// The status injected for this request, if any.
    pub(crate) fn draw_error(&self, shared: &Shared) -> Option<u16> {
        if self.error_rates.is_empty() {
            return None;
        }
        let u = shared.uniform();
        let mut cum = 0.0;
        for &(status, p) in &self.error_rates {
            cum += p.max(0.0);
            if u < cum {
                return Some(status);
            }
        }
        None
    }
}

/// The error-envelope `code` for an injected status.
pub(crate) fn code_for_status(status: u16) -> &'static str {
    match status {
        400 => "bad_request",
        401 => "invalid_token",
        403 => "permission_denied",
        404 => "not_found",
        408 => "request_timeout",
        409 => "conflict",
        422 => "validation_error",
        429 => "rate_limit_exceeded",
        500 => "internal_error",
        502 => "bad_gateway",
        503 => "service_unavailable",
        504 => "gateway_timeout",
        _ => "injected_error",
    }
}
