//! JSON decoder: the agent's own event schema, for panels, NVRs and bridges that can
//! publish JSON. It owns the schema below and a small RFC 3339 parser; it never looks at the
//! site configuration. Invariant: every known field is type- and range-checked, and a
//! mistake is rejected with a message naming the field; unknown fields are ignored.
//!
//! ## JSON event schema
//!
//! A payload is one event object, or an array of 1 to 100 event objects (a batch; each
//! becomes its own event). Fields:
//!
//! | field | required | value |
//! |---|---|---|
//! | `type` | yes | `"alarm"`, `"trouble"` or `"arming"` |
//! | `status` | yes | `"active"` (condition starts; for arming: armed) or `"restore"` (condition ends; for arming: disarmed). Arming events also accept `"armed"` and `"disarmed"`. |
//! | `event_id` | no | string, 1 to 128 characters, unique per device. When present the event's identity is derived from location, device and `event_id` alone, so a republished or redelivered event is sent to CHeKT once. |
//! | `zone` | no | zone number, integer 0 to 4294967295. Its name, type, partition and cameras come from the site file. When absent, the topic rule's `zone` applies. |
//! | `partition` | no | partition (area) number; when absent, the zone's configured partition |
//! | `user` | no | user number (who armed or disarmed) |
//! | `camera_channel` | no | NVR channel of the camera that saw the event; its CHeKT camera id is listed first |
//! | `code` | no | source code, string, 1 to 64 characters, forwarded as is |
//! | `description` | no | string, 1 to 256 characters; default: derived from type, status and zone, e.g. `"Alarm, zone 4 (Front door)"` |
//! | `time` | no | when the device says it happened: integer Unix milliseconds, or an RFC 3339 string such as `"2026-12-04T21:05:00Z"` or `"2026-12-04T22:05:00.250+01:00"` (offset required) |
//! | `priority` | no | `"normal"` (default) or `"routine"` (delivered after alarm, trouble and arming traffic) |
//!
//! `null` counts as absent. Unknown fields are ignored so newer publishers keep working; a
//! known field with the wrong type or out of range rejects the whole message, naming the
//! field (``field `zone`: expected a non-negative integer``).
//!
//! ```json
//! {"type": "alarm", "status": "active", "zone": 4, "camera_channel": 2,
//!  "event_id": "nvr1-88123", "time": "2026-12-04T21:05:00Z", "code": "E130"}
//! ```

use serde_json::{Map, Value};

use super::{Decoded, Item, MAX_EVENTS, Reject, show};
use crate::event::{EventStatus, EventType};

/// 9999-12-31T23:59:59.999Z, the latest device time accepted.
const MAX_TIME_MS: i64 = 253_402_300_799_999;

pub(crate) fn decode(text: &str) -> Result<Vec<Item>, Reject> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| Reject::Json(format!("not valid JSON: {e}")))?;
    match value {
        Value::Object(o) => Ok(vec![Item::Event(event(&o).map_err(Reject::Json)?)]),
        Value::Array(list) => {
            if list.is_empty() {
                return Err(Reject::Json("batch is empty".into()));
            }
            if list.len() > MAX_EVENTS {
                return Err(Reject::Json(format!(
                    "batch has {} events; at most {MAX_EVENTS} are allowed",
                    list.len()
                )));
            }
            list.iter()
                .enumerate()
                .map(|(i, v)| {
                    let r = match v {
                        Value::Object(o) => event(o),
                        other => Err(format!("expected an event object, got {}", kind(other))),
                    };
                    r.map(Item::Event)
                        .map_err(|e| Reject::Json(format!("event[{i}]: {e}")))
                })
                .collect()
        }
        other => Err(Reject::Json(format!(
            "expected an event object or an array of them, got {}",
            kind(&other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn field(name: &str, msg: impl std::fmt::Display) -> String {
    format!("field `{name}`: {msg}")
}

fn opt_str<'v>(o: &'v Map<String, Value>, name: &str) -> Result<Option<&'v str>, String> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(field(name, format!("expected a string, got {}", kind(v)))),
    }
}

fn req_str<'v>(o: &'v Map<String, Value>, name: &str) -> Result<&'v str, String> {
    opt_str(o, name)?.ok_or_else(|| field(name, "is required"))
}

/// An optional string of 1..=`max` characters.
fn opt_text(o: &Map<String, Value>, name: &str, max: usize) -> Result<Option<String>, String> {
    match opt_str(o, name)? {
        Some(s) if s.is_empty() || s.chars().count() > max => {
            Err(field(name, format!("must be 1 to {max} characters")))
        }
        other => Ok(other.map(str::to_string)),
    }
}

fn opt_u32(o: &Map<String, Value>, name: &str) -> Result<Option<u32>, String> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| field(name, format!("{n} is larger than {}", u32::MAX))),
            None => Err(field(name, "expected a non-negative integer")),
        },
    }
}

fn event(o: &Map<String, Value>) -> Result<Decoded, String> {
    use EventStatus::{Active, Restore};
    use EventType::{Alarm, Arming, Trouble};
    let event_type = match req_str(o, "type")? {
        "alarm" => Alarm,
        "trouble" => Trouble,
        "arming" => Arming,
        other => {
            let msg = format!(
                "unknown value {}; expected \"alarm\", \"trouble\" or \"arming\"",
                show(other)
            );
            return Err(field("type", msg));
        }
    };
    let status = match (event_type, req_str(o, "status")?) {
        (_, "active") | (Arming, "armed") => Active,
        (_, "restore") | (Arming, "disarmed") => Restore,
        (_, other) => {
            let msg = format!(
                "unknown value {} for type \"{}\"; expected \"active\" or \"restore\" \
                 (arming also accepts \"armed\" and \"disarmed\")",
                show(other),
                event_type.as_str()
            );
            return Err(field("status", msg));
        }
    };
    let label = match (event_type, status) {
        (Alarm, Active) => "Alarm",
        (Alarm, Restore) => "Alarm restored",
        (Trouble, Active) => "Trouble",
        (Trouble, Restore) => "Trouble restored",
        (Arming, Active) => "Armed",
        (Arming, Restore) => "Disarmed",
    };
    let mut d = Decoded::new(event_type, status, label);
    d.event_id = opt_text(o, "event_id", 128)?;
    d.zone = opt_u32(o, "zone")?;
    d.partition = opt_u32(o, "partition")?;
    d.user = opt_u32(o, "user")?;
    d.camera_channel = opt_u32(o, "camera_channel")?;
    d.code = opt_text(o, "code", 64)?;
    d.description = opt_text(o, "description", 256)?;
    d.routine = match opt_str(o, "priority")? {
        None | Some("normal") => false,
        Some("routine") => true,
        Some(other) => {
            let msg = format!(
                "unknown value {}; expected \"normal\" or \"routine\"",
                show(other)
            );
            return Err(field("priority", msg));
        }
    };
    d.device_time_ms = match o.get("time") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_i64().filter(|ms| (0..=MAX_TIME_MS).contains(ms)) {
            Some(ms) => Some(ms),
            None if n.is_f64() => {
                return Err(field("time", "Unix milliseconds must be an integer"));
            }
            None => return Err(field("time", "Unix milliseconds out of range (1970..9999)")),
        },
        Some(Value::String(s)) => Some(parse_rfc3339(s).map_err(|e| field("time", e))?),
        Some(v) => {
            let msg = format!(
                "expected Unix milliseconds or an RFC 3339 string, got {}",
                kind(v)
            );
            return Err(field("time", msg));
        }
    };
    Ok(d)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff…](Z|±HH:MM)` into Unix milliseconds. Fractions beyond
/// milliseconds are truncated; a leap second (`:60`) counts as the next second.
pub(crate) fn parse_rfc3339(s: &str) -> Result<i64, String> {
    const SHAPE: &str = "expected an RFC 3339 time like \"2026-12-04T21:05:00Z\"";
    let b = s.as_bytes();
    let num = |at: usize, len: usize| -> Result<i64, String> {
        match b.get(at..at + len) {
            Some(p) if p.iter().all(u8::is_ascii_digit) => {
                Ok(p.iter().fold(0, |acc, d| acc * 10 + i64::from(*d - b'0')))
            }
            _ => Err(format!("{SHAPE}, got {}", show(s))),
        }
    };
    let sep = |at: usize, allowed: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if allowed.contains(c) => Ok(()),
            _ => Err(format!("{SHAPE}, got {}", show(s))),
        }
    };
    let year = num(0, 4)?;
    sep(4, b"-")?;
    let month = num(5, 2)?;
    sep(7, b"-")?;
    let day = num(8, 2)?;
    sep(10, b"Tt ")?;
    let hour = num(11, 2)?;
    sep(13, b":")?;
    let minute = num(14, 2)?;
    sep(16, b":")?;
    let second = num(17, 2)?;
    let mut i = 19;
    let mut millis = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start || i - start > 9 {
            return Err("fraction of a second must have 1 to 9 digits".into());
        }
        for k in 0..3 {
            let d = b
                .get(start + k)
                .filter(|_| start + k < i)
                .map_or(0, |d| *d - b'0');
            millis = millis * 10 + i64::from(d);
        }
    }
    let offset_min = match b.get(i) {
        Some(b'Z' | b'z') => {
            i += 1;
            0
        }
        Some(sign @ (b'+' | b'-')) => {
            let oh = num(i + 1, 2)?;
            sep(i + 3, b":")?;
            let om = num(i + 4, 2)?;
            if oh > 23 || om > 59 {
                return Err(format!("UTC offset {oh:02}:{om:02} is out of range"));
            }
            let sign = if *sign == b'-' { -1 } else { 1 };
            i += 6;
            sign * (oh * 60 + om)
        }
        _ => return Err("missing UTC offset (`Z` or `±HH:MM`)".into()),
    };
    if i != b.len() {
        return Err(format!(
            "unexpected characters after the time in {}",
            show(s)
        ));
    }
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is out of range"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(format!(
            "day {day} is out of range for {year:04}-{month:02}"
        ));
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(format!(
            "time of day {hour:02}:{minute:02}:{second:02} is out of range"
        ));
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_min * 60;
    let ms = secs * 1000 + millis;
    if !(0..=MAX_TIME_MS).contains(&ms) {
        return Err("time is before 1970 or after 9999".into());
    }
    Ok(ms)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339 as p;

    #[test]
    fn rfc3339_parses_and_checks_ranges() {
        assert_eq!(p("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(p("2026-12-04T21:05:00Z"), Ok(1_796_418_300_000));
        assert_eq!(p("2026-12-04T21:05:00+01:00"), Ok(1_796_414_700_000));
        assert_eq!(p("2026-12-04t20:05:00.25-00:00"), Ok(1_796_414_700_250));
        assert_eq!(p("1969-12-31T19:00:00.123456789-05:00"), Ok(123));
        assert_eq!(p("2024-02-29T00:00:00Z"), Ok(1_709_164_800_000));
        for bad in [
            "2023-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-01T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-12-04T24:00:00Z",
            "2026-12-04T21:60:00Z",
            "2026-12-04T21:05:61Z",
            "2026-12-04T21:05:00",
            "2026-12-04T21:05:00+24:00",
            "2026-12-04T21:05:00.Z",
            "2026-12-04T21:05:00Zjunk",
            "1969-12-31T23:59:59Z",
            "2026-1-04T21:05:00Z",
            "",
            "２０２６-12-04T21:05:00Z",
        ] {
            assert!(p(bad).is_err(), "{bad} should be rejected");
        }
    }
}
