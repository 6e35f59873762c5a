//! Tests for normalize: every decoder end to end through [`normalize`] against one site,
//! enrichment, identity, secrecy of the site's private fields, a table of malformed
//! payloads and never-panic property tests.

use super::*;
use proptest::prelude::*;

const SITE: &str = r#"
location_id = "LOC1"
recorder_id = "REC1"

[[camera]]
channel = 1
id = "cam-1"
name = "SECRET-camera-name"
rtsp_url = "rtsp://SECRET-u:SECRET-p@10.0.0.5/ch1"
username = "SECRET-username"
password = "SECRET-password"

[[camera]]
channel = 2
id = "cam-2"
name = "SECRET-second-camera"

[[camera]]
channel = 3
id = "cam-3"

[[zone]]
number = 4
name = "Front door"
type = "entry_exit"
partition = 1
cameras = [2, 1]
notes = "SECRET-notes: key under the mat"

[[zone]]
number = 7
name = "Garage"
cameras = [3]

[[rule]]
filter = "site/json/+"
format = "json"
device = "{1}"

[[rule]]
filter = "site/cid/+"
format = "contact_id"
device = "{1}"

[[rule]]
filter = "site/sia/+"
format = "sia"
device = "{1}"

[[rule]]
filter = "site/door/+/+"
format = "sia"
device = "{1}"
zone = "{2}"
"#;

fn site() -> SiteConfig {
    SiteConfig::parse(SITE, "site.toml").expect("test site parses")
}

fn run_at(topic: &str, payload: &[u8], msg_id: u64, at: i64) -> Result<Outcome, Reject> {
    let msg = Inbound {
        topic,
        payload,
        received_at_ms: at,
        msg_id,
    };
    normalize(&msg, &site())
}

fn events(topic: &str, payload: &str) -> Vec<Event> {
    match run_at(topic, payload.as_bytes(), 1, 1_000) {
        Ok(Outcome::Events(evs)) => evs,
        other => panic!("{payload:?}: expected events, got {other:?}"),
    }
}

/// One line per event: `type/status/class z=N:name:type p= u= cams=[..] code t= | description`.
fn summary(e: &Event) -> String {
    let opt = |v: Option<u32>| v.map_or("-".to_string(), |n| n.to_string());
    let zone = e.zone.as_ref().map_or("-".to_string(), |z| {
        let name = z.name.as_deref().unwrap_or("");
        format!(
            "{}:{name}:{}",
            z.number,
            z.zone_type.as_deref().unwrap_or("")
        )
    });
    format!(
        "{}/{}/{} z={zone} p={} u={} cams=[{}] {} t={} | {}",
        e.event_type.as_str(),
        e.status.as_str(),
        e.class.as_str(),
        opt(e.partition),
        opt(e.user),
        e.camera_ids.join(","),
        e.code.as_deref().unwrap_or("-"),
        e.device_time_ms.map_or("-".to_string(), |t| t.to_string()),
        e.description
    )
}

const Z4: &str = "alarm/active/alarm z=4:Front door:entry_exit p=1 u=- cams=[cam-2,cam-1]";
const CID130: &str = "CID:E130 t=- | Burglary alarm, zone 4 (Front door)";
const SIABA: &str = "SIA:BA t=- | Burglary alarm, zone 4 (Front door)";
const NONE: &str = "z=- p=- u=- cams=[]";

/// (topic, payload, expected summaries joined by " ;; ", or "ignored: <reason>"); `@…`
/// stand for the constants above.
#[rustfmt::skip]
const DECODES: &[(&str, &str, &str)] = &[
    ("site/json/nvr1", r#"{"type":"alarm","status":"active","zone":4,"camera_channel":1,"code":"X1","time":"2026-12-04T21:05:00+01:00","x":{"y":[1]}}"#,
     "alarm/active/alarm z=4:Front door:entry_exit p=1 u=- cams=[cam-1,cam-2] X1 t=1796414700000 | Alarm, zone 4 (Front door)"),
    ("site/json/nvr1", r#"[{"type":"arming","status":"armed","user":3,"partition":2},{"type":"arming","status":"disarmed","description":"Disarmed by app"},
       {"type":"trouble","status":"restore","zone":7,"camera_channel":2,"priority":"routine","time":5,"code":null}]"#,
     "arming/active/arming z=- p=2 u=3 cams=[] - t=- | Armed, user 3 ;; arming/restore/arming z=- p=- u=- cams=[] - t=- | Disarmed by app ;; \
      trouble/restore/other z=7:Garage: p=- u=- cams=[cam-2,cam-3] - t=5 | Trouble restored, zone 7 (Garage)"),
    ("site/json/nvr1", r#"{"type":"alarm","status":"restore","zone":99,"camera_channel":42,"priority":"normal"}"#,
     "alarm/restore/alarm z=99:: p=- u=- cams=[] - t=- | Alarm restored, zone 99"),
    ("site/cid/p1", "1234 18 1130 01 004", "@Z4 @CID130"),
    ("site/cid/p1", "1234181130010040", "@Z4 @CID130"),
    ("site/cid/p1", "123418113001004", "@Z4 @CID130"),
    ("site/cid/p1", "  E130 01 004\r\n", "@Z4 @CID130"),
    ("site/cid/p1", "1234 E130 01 004", "@Z4 @CID130"),
    ("site/cid/p1", "E13001004", "@Z4 @CID130"),
    ("site/cid/p1", "R130 00 007", "alarm/restore/alarm z=7:Garage: p=- u=- cams=[cam-3] CID:R130 t=- | Burglary alarm restored, zone 7 (Garage)"),
    ("site/cid/p1", "BCDE 98 6302 00 000", "trouble/active/trouble @NONE CID:E302 t=- | Low system battery (status report)"),
    ("site/cid/p1", "E110 00 000", "alarm/active/alarm @NONE CID:E110 t=- | Fire alarm"),
    // Open/close: Q1 (E, opening) is disarmed = restore; Q3 (R, closing) is armed = active.
    ("site/cid/p1", "1234 18 1401 02 003", "arming/restore/arming z=- p=2 u=3 cams=[] CID:E401 t=- | Disarmed, user 3"),
    ("site/cid/p1", "R401 01 003", "arming/active/arming z=- p=1 u=3 cams=[] CID:R401 t=- | Armed, user 3"),
    ("site/cid/p1", "1234 18 3441 01 005 7", "arming/active/arming z=- p=1 u=5 cams=[] CID:R441 t=- | Armed stay, user 5"),
    ("site/cid/p1", "E570 01 004", "arming/active/arming z=4:Front door:entry_exit p=1 u=- cams=[cam-2,cam-1] CID:E570 t=- | Zone bypassed, zone 4 (Front door)"),
    ("site/cid/p1", "1234 18 1602 00 000", "ignored: periodic test report (CID:E602) not forwarded"),
    ("site/sia/p1", "BA004", "@Z4 @SIABA"),
    ("site/sia/p1", "BA4", "@Z4 @SIABA"),
    ("site/sia/p1", "BA 4", "@Z4 @SIABA"),
    ("site/sia/p1", "Nri1/BA004", "@Z4 @SIABA"),
    ("site/sia/p1", "#1234|Nri1/BA004", "@Z4 @SIABA"),
    ("site/sia/p1", "NBA04/", "@Z4 @SIABA"),
    ("site/sia/p1", "#12AB|Nri2/BA004/BH005/RP",
     "alarm/active/alarm z=4:Front door:entry_exit p=2 u=- cams=[cam-2,cam-1] @SIABA ;; alarm/restore/alarm z=5:: p=2 u=- cams=[] SIA:BH t=- | Burglary alarm restored, zone 5"),
    ("site/sia/p1", "Nri1/OP3", "arming/restore/arming z=- p=1 u=3 cams=[] SIA:OP t=- | Disarmed, user 3"),
    ("site/sia/p1", "Nid9/CL", "arming/active/arming z=- p=- u=9 cams=[] SIA:CL t=- | Armed, user 9"),
    ("site/sia/p1", "Nti12:30/CG2", "arming/active/arming z=- p=- u=2 cams=[] SIA:CG t=- | Armed partially, user 2"),
    ("site/sia/p1", "YT", "trouble/active/trouble @NONE SIA:YT t=- | Battery trouble"),
    ("site/sia/p1", "RP", "ignored: automatic test report (SIA:RP) not forwarded"),
    // The rule's zone template fills a zone the payload does not give.
    ("site/door/sensor9/7", "BA", "alarm/active/alarm z=7:Garage: p=- u=- cams=[cam-3] SIA:BA t=- | Burglary alarm, zone 7 (Garage)"),
    ("site/door/sensor9/7", "BA4", "@Z4 @SIABA"),
];

#[test]
fn decodes_and_enriches() {
    for (topic, payload, want) in DECODES {
        let want = want
            .replace("@Z4", Z4)
            .replace("@CID130", CID130)
            .replace("@SIABA", SIABA)
            .replace("@NONE", NONE);
        let got = match run_at(topic, payload.as_bytes(), 1, 1_000) {
            Ok(Outcome::Events(evs)) => {
                for e in &evs {
                    assert_eq!(
                        (e.location_id.as_str(), e.recorder_id.as_deref()),
                        ("LOC1", Some("REC1"))
                    );
                    assert_eq!((e.received_at_ms, e.id.len()), (1_000, 32));
                    assert_eq!(Some(e.device_id.as_str()), topic.split('/').nth(2));
                }
                evs.iter().map(summary).collect::<Vec<_>>().join(" ;; ")
            }
            Ok(Outcome::Ignored(why)) => format!("ignored: {why}"),
            Err(r) => format!("rejected: {r}"),
        };
        assert_eq!(got, want, "payload {payload:?}");
    }
}

#[test]
fn identity_rules() {
    let id = |topic: &str, p: &str, msg_id: u64, at: i64| {
        let r = run_at(topic, p.as_bytes(), msg_id, at);
        let Ok(Outcome::Events(evs)) = r else {
            panic!("{r:?}")
        };
        evs.into_iter().map(|e| e.id).collect::<Vec<_>>()
    };
    let (t, cid) = ("site/cid/p", "E130 01 004");
    assert_eq!(id(t, cid, 1, 5), id(t, cid, 1, 5));
    assert_ne!(id(t, cid, 1, 5), id(t, cid, 2, 5));
    assert_ne!(id(t, cid, 1, 5), id(t, cid, 1, 6));
    assert_ne!(id(t, cid, 1, 5), id("site/cid/q", cid, 1, 5));
    let two = id("site/sia/p", "BA1/BA1", 1, 5);
    assert_ne!(
        two.first(),
        two.get(1),
        "index within the message is part of the identity"
    );
    let j = r#"{"type":"alarm","status":"active","event_id":"ev-1"}"#;
    let j2 = r#"{"status":"active","type":"alarm","event_id":"ev-1","zone":4}"#;
    let want = vec![crate::event::identity(&[b"LOC1", b"nvr", b"ev-1"])];
    assert_eq!(id("site/json/nvr", j, 1, 5), want);
    assert_eq!(id("site/json/nvr", j2, 99, 77), want);
    assert_ne!(id("site/json/nvr", j, 1, 5), id("site/json/other", j, 1, 5));
    let no_eid = r#"{"type":"alarm","status":"active"}"#;
    assert_ne!(
        id("site/json/nvr", no_eid, 1, 5),
        id("site/json/nvr", no_eid, 2, 5)
    );
}

#[test]
fn site_secrets_never_reach_events() {
    let mut all = events(
        "site/json/nvr",
        r#"[{"type":"alarm","status":"active","zone":4,"camera_channel":2}]"#,
    );
    all.extend(events("site/cid/p1", "E130 01 004"));
    all.extend(events("site/sia/p1", "BA004"));
    for e in &all {
        assert!(e.camera_ids.contains(&"cam-1".to_string()));
        for text in [format!("{e:?}"), e.to_api_body().to_string()] {
            for secret in ["SECRET", "10.0.0.5", "rtsp", "key under", "notes"] {
                assert!(!text.contains(secret), "{secret} leaked into {text}");
            }
        }
    }
}

/// (topic, payload, expected variant, text the reason must contain).
#[rustfmt::skip]
const MALFORMED: &[(&str, &str, &str, &str)] = &[
    ("elsewhere/x", "BA4", "NoRule", "elsewhere"),
    ("site/json/", "{}", "Rule", "device"),
    ("site/door/d/front", "BA", "Rule", "zone"),
    ("site/json/d", "not json", "Json", "not valid JSON"),
    ("site/json/d", "42", "Json", "got a number"),
    ("site/json/d", "[]", "Json", "empty"),
    ("site/json/d", "[1]", "Json", "event[0]: expected an event object"),
    ("site/json/d", r#"{"status":"active"}"#, "Json", "field `type`: is required"),
    ("site/json/d", r#"{"type":"fire","status":"active"}"#, "Json", "field `type`: unknown value"),
    ("site/json/d", r#"{"type":"alarm","status":"armed"}"#, "Json", "field `status`"),
    ("site/json/d", r#"{"type":"alarm","status":3}"#, "Json", "field `status`: expected a string"),
    ("site/json/d", r#"{"type":"alarm","status":"active","zone":-1}"#, "Json", "field `zone`: expected a non-negative integer"),
    ("site/json/d", r#"{"type":"alarm","status":"active","zone":"4"}"#, "Json", "field `zone`"),
    ("site/json/d", r#"{"type":"alarm","status":"active","user":4294967296}"#, "Json", "field `user`"),
    ("site/json/d", r#"{"type":"alarm","status":"active","partition":1.5}"#, "Json", "field `partition`"),
    ("site/json/d", r#"{"type":"alarm","status":"active","camera_channel":true}"#, "Json", "field `camera_channel`"),
    ("site/json/d", r#"{"type":"alarm","status":"active","event_id":""}"#, "Json", "field `event_id`"),
    ("site/json/d", r#"{"type":"alarm","status":"active","event_id":7}"#, "Json", "field `event_id`"),
    ("site/json/d", r#"{"type":"alarm","status":"active","time":"2026-13-01T00:00:00Z"}"#, "Json", "month 13"),
    ("site/json/d", r#"{"type":"alarm","status":"active","time":"2026-02-30T00:00:00Z"}"#, "Json", "day 30"),
    ("site/json/d", r#"{"type":"alarm","status":"active","time":"2026-12-04T21:05:00"}"#, "Json", "offset"),
    ("site/json/d", r#"{"type":"alarm","status":"active","time":1.5}"#, "Json", "field `time`"),
    ("site/json/d", r#"{"type":"alarm","status":"active","time":-1}"#, "Json", "field `time`"),
    ("site/json/d", r#"{"type":"alarm","status":"active","priority":"urgent"}"#, "Json", "field `priority`"),
    ("site/json/d", r#"[{"type":"alarm","status":"active"},{"type":"alarm"}]"#, "Json", "event[1]: field `status`"),
    ("site/cid/p", "1234 17 1130 01 004", "ContactId", "message type 17"),
    ("site/cid/p", "1234 18 2130 01 004", "ContactId", "qualifier 2"),
    ("site/cid/p", "1234 18 1999 01 004", "ContactId", "event code 999 is not mapped"),
    ("site/cid/p", "E13A 01 004", "ContactId", "event code"),
    ("site/cid/p", "X130 01 004", "ContactId", "`E` or `R`"),
    ("site/cid/p", "1234181130", "ContactId", "compact"),
    ("site/cid/p", "1234 18 1130 0A 004", "ContactId", "partition"),
    ("site/cid/p", "1234 18 1130 01 04", "ContactId", "zone/user"),
    ("site/cid/p", "12G4 18 1130 01 004", "ContactId", "account"),
    ("site/cid/p", "1234 18 1130 01 004 XY", "ContactId", "checksum"),
    ("site/cid/p", "hello there", "ContactId", "layout"),
    ("site/cid/p", "   ", "ContactId", "layout"),
    ("site/sia/p", "ZZ004", "Sia", "unknown event code `ZZ`"),
    ("site/sia/p", "Nri1", "Sia", "no event code"),
    ("site/sia/p", "#12G4|BA004", "Sia", "account"),
    ("site/sia/p", "#1234BA004", "Sia", "`|`"),
    ("site/sia/p", "BA0000000001", "Sia", "too long"),
    ("site/sia/p", "ba004", "Sia", "unrecognized"),
    ("site/sia/p", "BA004^door^", "Sia", "unrecognized"),
    ("site/sia/p", "Nri/BA4", "Sia", "`ri` needs a number"),
];

#[test]
fn malformed_payloads_are_rejected_specifically() {
    let json =
        |extra: String| format!(r#"{{"type":"alarm","status":"active",{extra}}}"#).into_bytes();
    let mut cases: Vec<(&str, Vec<u8>, &str, &str)> = MALFORMED
        .iter()
        .map(|(t, p, v, n)| (*t, p.as_bytes().to_vec(), *v, *n))
        .collect();
    cases.extend([
        ("site/json/d", vec![], "Empty", "empty"),
        (
            "site/json/d",
            vec![b' '; MAX_PAYLOAD + 1],
            "TooLarge",
            "65536",
        ),
        ("site/json/d", b"\xff\xfe{}".to_vec(), "NotUtf8", "UTF-8"),
        (
            "site/json/d",
            format!("[{}]", vec!["{}"; 101].join(",")).into_bytes(),
            "Json",
            "at most 100",
        ),
        (
            "site/json/d",
            json(format!(r#""event_id":"{}""#, "x".repeat(129))),
            "Json",
            "field `event_id`",
        ),
        (
            "site/json/d",
            json(format!(r#""code":"{}""#, "c".repeat(65))),
            "Json",
            "field `code`",
        ),
        (
            "site/json/d",
            json(format!(r#""description":"{}""#, "d".repeat(257))),
            "Json",
            "field `description`",
        ),
        (
            "site/sia/p",
            vec!["BA1"; 101].join("/").into_bytes(),
            "Sia",
            "more than 100",
        ),
    ]);
    assert!(cases.len() >= 25);
    for (topic, payload, want, needle) in cases {
        let shown = String::from_utf8_lossy(payload.get(..60).unwrap_or(&payload)).into_owned();
        let r = run_at(topic, &payload, 1, 1).expect_err(&shown);
        let (got, msg) = match &r {
            Reject::NoRule(m) => ("NoRule", m.clone()),
            Reject::NotUtf8 => ("NotUtf8", r.to_string()),
            Reject::Empty => ("Empty", r.to_string()),
            Reject::TooLarge(n) => ("TooLarge", n.to_string()),
            Reject::Json(m) => ("Json", m.clone()),
            Reject::ContactId(m) => ("ContactId", m.clone()),
            Reject::Sia(m) => ("Sia", m.clone()),
            Reject::Rule(m) => ("Rule", m.clone()),
        };
        assert_eq!(got, want, "{shown}: {r}");
        assert!(
            msg.contains(needle) && !r.to_string().is_empty(),
            "{shown}: {msg:?} lacks {needle:?}"
        );
    }
}

fn check_no_panic(topic: &str, payload: &[u8]) {
    if let Ok(Outcome::Events(evs)) = run_at(topic, payload, 3, 3) {
        assert!(!evs.is_empty() && evs.len() <= MAX_EVENTS);
        assert!(
            evs.iter()
                .all(|e| e.id.len() == 32 && e.location_id == "LOC1")
        );
    }
}

const TOPICS: [&str; 4] = ["site/json/d", "site/cid/d", "site/sia/d", "site/door/d/4"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_bytes(payload in proptest::collection::vec(any::<u8>(), 0..300), t in 0..4usize) {
        check_no_panic(TOPICS[t], &payload);
    }

    #[test]
    fn never_panics_on_strings(s in any::<String>(), t in 0..4usize) {
        check_no_panic(TOPICS[t], s.as_bytes());
    }

    #[test]
    fn never_panics_on_near_valid_text(
        cid in "[0-9A-FER ]{0,22}",
        sia in "#?[0-9A-F|]{0,6}N?(ri|id|ti|pi)?[0-9:]{0,3}(/?[A-Z]{2} ?[0-9]{0,4}){0,4}",
        json in r#"\{("(type|status|zone|time|event_id|priority)":("[a-z0-9:T+-]{0,22}"|-?[0-9.]{1,12}|null|\[\]),?){0,6}\}"#,
    ) {
        check_no_panic("site/cid/d", cid.as_bytes());
        check_no_panic("site/sia/d", sia.as_bytes());
        check_no_panic("site/door/d/4", sia.as_bytes());
        check_no_panic("site/json/d", json.as_bytes());
    }
}
