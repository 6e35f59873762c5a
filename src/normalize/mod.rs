//! Normalize: turns one MQTT message into CHeKT events. Pure: no I/O, no clock, no
//! randomness — everything time- or identity-related comes in through [`Inbound`].
//! (stub: implementation in progress)

use crate::event::Event;
use crate::site::SiteConfig;

/// One message as received from the broker, with what the agent adds on receipt.
#[derive(Clone, Copy, Debug)]
pub struct Inbound<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// Receipt time, Unix milliseconds (corrected clock).
    pub received_at_ms: i64,
    /// Spool-assigned, unique, never reused message number.
    pub msg_id: u64,
}

/// What became of a message that was understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Events to spool (one message may carry several).
    Events(Vec<Event>),
    /// Understood but deliberately not forwarded (e.g. a periodic test report).
    Ignored(String),
}

/// Why a message could not be decoded. The message goes to the dead-letter store with
/// this reason and its original bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("no topic rule matches topic {0:?}")]
    NoRule(String),
    #[error("payload is not valid UTF-8")]
    NotUtf8,
    #[error("payload is empty")]
    Empty,
    #[error("payload is larger than {0} bytes")]
    TooLarge(usize),
    #[error("JSON event: {0}")]
    Json(String),
    #[error("Contact ID: {0}")]
    ContactId(String),
    #[error("SIA: {0}")]
    Sia(String),
    #[error("topic rule: {0}")]
    Rule(String),
}

pub fn normalize(_msg: &Inbound<'_>, _site: &SiteConfig) -> Result<Outcome, Reject> {
    Err(Reject::Rule("not yet".into()))
}
