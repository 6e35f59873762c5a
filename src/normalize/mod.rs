//! Normalize: turns one MQTT message into CHeKT [`Event`]s. It owns the payload limits,
//! topic-rule resolution (device and zone templates), dispatch to the three decoders
//! ([`json`], [`contact_id`], [`sia`]), enrichment from the local [`SiteConfig`] and event
//! identity.
//!
//! Invariants:
//! - Pure: no I/O, no clock, no randomness — everything time- or identity-related comes in
//!   through [`Inbound`]. The same message and site always give the same outcome and ids.
//! - Never panics, whatever the topic or payload: decoders use checked access only, and a
//!   message they cannot understand becomes a [`Reject`] naming the reason.
//! - Enrichment copies only the site's location/recorder ids, zone number/name/type/partition
//!   and CHeKT camera *ids*. Camera names, RTSP URLs, credentials and notes never reach an
//!   event.
//! - Identity: an event whose JSON payload carries `event_id` gets
//!   `identity(location_id, device_id, event_id)`, so redeliveries and republishes dedupe;
//!   any other event gets `identity(topic, payload, received_at_ms, msg_id, index)` where
//!   `index` is its position among the message's events.
//! - Enrichment: the payload's zone, else the rule's `zone` template, is looked up in the
//!   site; partition comes from the payload, else the zone's configuration. `camera_ids`
//!   lists the camera the payload names (JSON `camera_channel`, if configured) first, then the
//!   zone's cameras in configured order, without duplicates.

mod contact_id;
mod json;
mod sia;
#[cfg(test)]
mod tests;

use crate::event::{Class, Event, EventStatus, EventType, ZoneRef, identity};
use crate::site::{Format, SiteConfig, resolve_template};

/// Largest payload accepted, in bytes.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most events one message (JSON batch or SIA block) may carry.
pub const MAX_EVENTS: usize = 100;

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

/// One event as a decoder understood it, before enrichment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub event_type: EventType,
    pub status: EventStatus,
    pub zone: Option<u32>,
    pub partition: Option<u32>,
    pub user: Option<u32>,
    pub code: Option<String>,
    /// Short text ("Burglary alarm"); zone and user details are appended on enrichment.
    pub label: String,
    /// A description the payload gave verbatim; replaces the composed one.
    pub description: Option<String>,
    pub device_time_ms: Option<i64>,
    pub camera_channel: Option<u32>,
    pub routine: bool,
    pub event_id: Option<String>,
}

impl Decoded {
    pub fn new(event_type: EventType, status: EventStatus, label: impl Into<String>) -> Self {
        Decoded {
            event_type,
            status,
            zone: None,
            partition: None,
            user: None,
            code: None,
            label: label.into(),
            description: None,
            device_time_ms: None,
            camera_channel: None,
            routine: false,
            event_id: None,
        }
    }
}

/// What a decoder found in a message, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Item {
    Event(Decoded),
    /// Understood and deliberately dropped, with the reason.
    Ignored(String),
}

/// `s` for an error message: quoted, and cut to 40 characters so a huge payload does not
/// become a huge dead-letter reason.
pub(crate) fn show(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((at, _)) => format!("{:?}…", s.get(..at).unwrap_or("")),
        None => format!("{s:?}"),
    }
}

/// Decodes one message and enriches its events from `site`.
pub fn normalize(msg: &Inbound<'_>, site: &SiteConfig) -> Result<Outcome, Reject> {
    if msg.payload.is_empty() {
        return Err(Reject::Empty);
    }
    if msg.payload.len() > MAX_PAYLOAD {
        return Err(Reject::TooLarge(MAX_PAYLOAD));
    }
    let text = std::str::from_utf8(msg.payload).map_err(|_| Reject::NotUtf8)?;
    let (rule, caps) = site
        .match_topic(msg.topic)
        .ok_or_else(|| Reject::NoRule(msg.topic.to_string()))?;
    let device_id = resolve_template(&rule.device, &caps)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| {
            Reject::Rule(format!(
                "device template {:?} gives no device id for topic {}",
                rule.device,
                show(msg.topic)
            ))
        })?;
    let rule_zone = match &rule.zone {
        None => None,
        Some(t) => {
            let z = resolve_template(t, &caps).unwrap_or("");
            Some(z.parse::<u32>().map_err(|_| {
                Reject::Rule(format!(
                    "zone template {t:?} gives {} for topic {}, which is not a zone number",
                    show(z),
                    show(msg.topic)
                ))
            })?)
        }
    };
    let items = match rule.format {
        Format::Json => json::decode(text)?,
        Format::ContactId => contact_id::decode(text)?,
        Format::Sia => sia::decode(text)?,
    };
    let mut events = Vec::new();
    let mut ignored = Vec::new();
    for item in items {
        match item {
            Item::Event(d) => {
                let index = u32::try_from(events.len()).unwrap_or(u32::MAX);
                events.push(build(d, msg, site, device_id, rule_zone, index));
            }
            Item::Ignored(why) => ignored.push(why),
        }
    }
    if events.is_empty() {
        return Ok(Outcome::Ignored(if ignored.is_empty() {
            "message carried no events".into()
        } else {
            ignored.join("; ")
        }));
    }
    Ok(Outcome::Events(events))
}

/// Enriches one decoded event and fixes its identity.
fn build(
    d: Decoded,
    msg: &Inbound<'_>,
    site: &SiteConfig,
    device_id: &str,
    rule_zone: Option<u32>,
    index: u32,
) -> Event {
    let zone_no = d.zone.or(rule_zone);
    let zone_cfg = zone_no.and_then(|n| site.zone(n));
    let zone = zone_no.map(|number| ZoneRef {
        number,
        name: zone_cfg.map(|z| z.name.clone()),
        zone_type: zone_cfg.and_then(|z| z.zone_type.clone()),
    });
    let partition = d.partition.or(zone_cfg.and_then(|z| z.partition));
    let zone_channels = zone_cfg.map(|z| z.cameras.as_slice()).unwrap_or(&[]);
    let mut camera_ids: Vec<String> = Vec::new();
    for ch in d.camera_channel.iter().chain(zone_channels) {
        if let Some(cam) = site.camera(*ch)
            && !camera_ids.contains(&cam.id)
        {
            camera_ids.push(cam.id.clone());
        }
    }
    let description = match d.description {
        Some(text) => text,
        None => describe(&d.label, zone.as_ref(), d.user),
    };
    let id = match &d.event_id {
        Some(eid) => identity(&[
            site.location_id.as_bytes(),
            device_id.as_bytes(),
            eid.as_bytes(),
        ]),
        None => identity(&[
            msg.topic.as_bytes(),
            msg.payload,
            &msg.received_at_ms.to_be_bytes(),
            &msg.msg_id.to_be_bytes(),
            &index.to_be_bytes(),
        ]),
    };
    Event {
        id,
        class: if d.routine {
            Class::Other
        } else {
            d.event_type.default_class()
        },
        event_type: d.event_type,
        status: d.status,
        location_id: site.location_id.clone(),
        recorder_id: site.recorder_id.clone(),
        device_id: device_id.to_string(),
        zone,
        partition,
        user: d.user,
        camera_ids,
        code: d.code,
        description,
        device_time_ms: d.device_time_ms,
        received_at_ms: msg.received_at_ms,
    }
}

/// "Burglary alarm, zone 4 (Front door)", "Disarmed, user 3".
fn describe(label: &str, zone: Option<&ZoneRef>, user: Option<u32>) -> String {
    let mut s = label.to_string();
    if let Some(z) = zone {
        s.push_str(&format!(", zone {}", z.number));
        if let Some(name) = &z.name {
            s.push_str(&format!(" ({name})"));
        }
    }
    if let Some(u) = user {
        s.push_str(&format!(", user {u}"));
    }
    s
}
