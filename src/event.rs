//! The event model shared by every stage of the pipeline.
//!
//! An [`Event`] is what normalize produces, what the spool stores (postcard-encoded)
//! and what upload turns into a CHeKT Partner Event API request body. It owns no I/O.
//!
//! Invariants:
//! - `id` is fixed when the event is first normalized and never changes afterwards; the
//!   `Idempotency-Key` sent to CHeKT is derived from it alone, so every retry, across
//!   restarts, carries the same key.
//! - `class` orders delivery: alarm before trouble before arming before routine; FIFO
//!   within a class.
//! - Nothing from the site's private configuration (RTSP URLs, credentials, notes) is ever
//!   copied into an event: enrichment copies only the names and ids listed here.
//! - The API body is a function of the stored event alone (never of the clock at sending
//!   time), so every retry of an event sends the same body under the same key. A receipt
//!   time before 2026 came from a clock not yet corrected (a gateway that booted at 1970)
//!   and is left out of the body rather than sent wrong.

use serde::{Deserialize, Serialize};

/// Delivery priority. The numeric value is part of the spool's on-disk key layout:
/// lower numbers are delivered first. Do not renumber.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Class {
    Alarm = 0,
    Trouble = 1,
    Arming = 2,
    /// Routine traffic (e.g. analytics detections the partner marks routine).
    Other = 3,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Alarm, Class::Trouble, Class::Arming, Class::Other];

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Class> {
        Class::ALL.get(v as usize).copied()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Alarm => "alarm",
            Class::Trouble => "trouble",
            Class::Arming => "arming",
            Class::Other => "other",
        }
    }
}

/// CHeKT's `event_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    Alarm,
    Trouble,
    Arming,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Alarm => "alarm",
            EventType::Trouble => "trouble",
            EventType::Arming => "arming",
        }
    }

    /// The class an event of this type is delivered in, unless marked routine.
    pub fn default_class(self) -> Class {
        match self {
            EventType::Alarm => Class::Alarm,
            EventType::Trouble => Class::Trouble,
            EventType::Arming => Class::Arming,
        }
    }
}

/// CHeKT's `event_status`: the start (`active`) or end (`restore`) of a condition.
/// For arming events `active` means armed (closing) and `restore` means disarmed (opening).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventStatus {
    Active,
    Restore,
}

impl EventStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Active => "active",
            EventStatus::Restore => "restore",
        }
    }
}

/// The zone an event concerns, as enriched from the local panel configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneRef {
    pub number: u32,
    /// Name from the site configuration, if the zone is configured.
    pub name: Option<String>,
    /// Zone type from the site configuration (e.g. "entry_exit", "perimeter").
    pub zone_type: Option<String>,
}

/// One normalized event, ready to spool and send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stable identity (lower-case hex). The idempotency key is derived from it.
    pub id: String,
    pub class: Class,
    pub event_type: EventType,
    pub status: EventStatus,
    /// CHeKT location (site) id.
    pub location_id: String,
    /// CHeKT recorder id, if the site has one.
    pub recorder_id: Option<String>,
    /// The local device that reported (panel, NVR, camera), from the topic rule.
    pub device_id: String,
    pub zone: Option<ZoneRef>,
    pub partition: Option<u32>,
    /// User number for arming events.
    pub user: Option<u32>,
    /// CHeKT camera ids of the cameras that watch the zone (or the reporting camera).
    pub camera_ids: Vec<String>,
    /// Source code, e.g. `CID:E130`, `SIA:BA`, or the JSON schema's `code`.
    pub code: Option<String>,
    /// Human-readable summary.
    pub description: String,
    /// Time the device says the event happened, Unix milliseconds, if it said.
    pub device_time_ms: Option<i64>,
    /// Time the agent received the message, Unix milliseconds (corrected clock).
    pub received_at_ms: i64,
}

impl Event {
    /// The `Idempotency-Key` header value: derived from the identity alone.
    pub fn idempotency_key(&self) -> String {
        format!("chekt-agent-{}", self.id)
    }

    /// The JSON body sent to `POST /partner/v1/events`.
    pub fn to_api_body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "version": "1.0",
            "location_id": self.location_id,
            "event_id": self.id,
            "event_type": self.event_type.as_str(),
            "event_status": self.status.as_str(),
            "device_id": self.device_id,
            "description": self.description,
            "priority": self.class.as_str(),
        });
        let obj = body.as_object_mut().expect("json object literal");
        if self.received_at_ms >= crate::clock::MIN_PLAUSIBLE * 1000 {
            obj.insert("received_at".into(), self.received_at_ms.into());
        }
        if let Some(r) = &self.recorder_id {
            obj.insert("recorder_id".into(), r.clone().into());
        }
        if let Some(first) = self.camera_ids.first() {
            obj.insert("camera_id".into(), first.clone().into());
        }
        if !self.camera_ids.is_empty() {
            obj.insert("camera_ids".into(), self.camera_ids.clone().into());
        }
        if let Some(z) = &self.zone {
            let mut zone = serde_json::json!({ "number": z.number });
            if let Some(n) = &z.name {
                zone["name"] = n.clone().into();
            }
            if let Some(t) = &z.zone_type {
                zone["type"] = t.clone().into();
            }
            obj.insert("zone".into(), zone);
        }
        if let Some(p) = self.partition {
            obj.insert("partition".into(), p.into());
        }
        if let Some(u) = self.user {
            obj.insert("user".into(), u.into());
        }
        if let Some(c) = &self.code {
            obj.insert("code".into(), c.clone().into());
        }
        if let Some(t) = self.device_time_ms {
            obj.insert("event_time".into(), t.into());
        }
        body
    }
}

impl Event {
    /// An event the agent raises about itself (device `chekt-agent`, code `AGENT:<code>`):
    /// store reset, events dropped for space.
    pub fn agent_trouble(
        location_id: &str,
        recorder_id: Option<&str>,
        now_ms: i64,
        code: &str,
        description: String,
    ) -> Event {
        Event {
            id: identity(&[
                b"agent",
                code.as_bytes(),
                &now_ms.to_be_bytes(),
                description.as_bytes(),
            ]),
            class: Class::Trouble,
            event_type: EventType::Trouble,
            status: EventStatus::Active,
            location_id: location_id.to_string(),
            recorder_id: recorder_id.map(str::to_string),
            device_id: "chekt-agent".into(),
            zone: None,
            partition: None,
            user: None,
            camera_ids: vec![],
            code: Some(format!("AGENT:{code}")),
            description,
            device_time_ms: None,
            received_at_ms: now_ms,
        }
    }
}

/// Lower-case hex SHA-256 over length-prefixed parts, truncated to 32 hex chars (128 bits).
/// Length prefixes make `("ab","c")` and `("a","bc")` differ.
pub fn identity(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let d = ctx.finish();
    let mut s = String::with_capacity(32);
    for b in &d.as_ref()[..16] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_length_prefixed_and_stable() {
        assert_ne!(identity(&[b"ab", b"c"]), identity(&[b"a", b"bc"]));
        assert_eq!(identity(&[b"x"]), identity(&[b"x"]));
        assert_eq!(identity(&[b"x"]).len(), 32);
    }

    #[test]
    fn received_at_from_an_uncorrected_clock_is_left_out() {
        let at = |ms| Event::agent_trouble("L", None, ms, "t", "d".into()).to_api_body();
        // 2027-01-15: sent as is.
        assert_eq!(at(1_800_000_000_000)["received_at"], 1_800_000_000_000_i64);
        // A day after 1970 and one millisecond before 2026: left out.
        assert!(at(86_400_000).get("received_at").is_none());
        let just_before = crate::clock::MIN_PLAUSIBLE * 1000 - 1;
        assert!(at(just_before).get("received_at").is_none());
    }

    #[test]
    fn class_round_trips_through_u8() {
        for c in Class::ALL {
            assert_eq!(Class::from_u8(c.as_u8()), Some(c));
        }
        assert_eq!(Class::from_u8(4), None);
    }
}
