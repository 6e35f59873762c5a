//! Contact ID decoder (Ademco / SIA DC-05 as printed by receivers and panel bridges). It
//! owns the accepted layouts and the event-code table; it never looks at the site.
//!
//! Accepted layouts (tokens separated by whitespace):
//! - `ACCT MT QXYZ GG CCC [K]`, e.g. `1234 18 1130 01 004` (account 3-10 hex digits,
//!   optional checksum digit `K` ignored);
//! - compact `AAAAMMQXYZGGCCC[K]`, e.g. `1234181130010040` (4-digit account);
//! - receiver form `E130 01 004` / `R401 01 003`, optionally after the account
//!   (`1234 E130 01 004`), also compact `E13001004`.
//!
//! `MT` must be 18 or 98; `Q` is 1 (new / `E`), 3 (restore / `R`) or 6 (previously
//! reported: decoded like 1, description marked "(status report)"). `GG` 00 and `CCC` 000
//! mean "none".
//!
//! Invariants: only mapped codes become events (see [`kind`]); 601/602 test reports are
//! ignored; anything else is rejected naming the code. Open/close codes (400-409, 441)
//! invert Contact ID's qualifier: Q1 is an *opening* (disarm) and becomes CHeKT
//! `restore`; Q3 is a *closing* (arm) and becomes `active`. For them `CCC` is the user
//! number; for every other code it is the zone (570 bypass included).

use super::{Decoded, Item, Reject, show};
use crate::event::{EventStatus, EventType};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Alarm,
    Trouble,
    OpenClose,
    Bypass,
    Test,
}

/// The CHeKT meaning of an event code, if the agent forwards it.
fn kind(code: u32) -> Option<Kind> {
    match code {
        100..=102 | 110..=118 | 120..=122 | 130..=139 | 150..=162 => Some(Kind::Alarm),
        300..=339 | 350..=359 | 370..=389 => Some(Kind::Trouble),
        400..=409 | 441 => Some(Kind::OpenClose),
        570 => Some(Kind::Bypass),
        601 | 602 => Some(Kind::Test),
        _ => None,
    }
}

fn label(code: u32) -> &'static str {
    match code {
        100..=102 => "Medical alarm",
        111 => "Smoke alarm",
        114 => "Heat alarm",
        110..=118 => "Fire alarm",
        120 => "Panic alarm",
        121 => "Duress alarm",
        122 => "Silent panic alarm",
        131 => "Perimeter burglary alarm",
        132 => "Interior burglary alarm",
        134 => "Entry/exit burglary alarm",
        137 => "Tamper alarm",
        130..=139 => "Burglary alarm",
        151 => "Gas alarm",
        162 => "Carbon monoxide alarm",
        150..=162 => "24-hour non-burglary alarm",
        301 => "AC power loss",
        302 => "Low system battery",
        300..=339 => "System trouble",
        350..=359 => "Communication trouble",
        383 => "Sensor tamper",
        384 => "RF low battery",
        370..=389 => "Sensor trouble",
        _ => "Event",
    }
}

fn err(msg: String) -> Reject {
    Reject::ContactId(msg)
}

/// `tok` as a number of exactly `n` decimal digits.
fn digits(tok: &str, n: usize, what: &str) -> Result<u32, Reject> {
    if tok.len() == n && tok.bytes().all(|b| b.is_ascii_digit()) {
        Ok(tok.bytes().fold(0, |acc, b| acc * 10 + u32::from(b - b'0')))
    } else {
        Err(err(format!(
            "{what} must be {n} decimal digits, got {}",
            show(tok)
        )))
    }
}

fn account(tok: &str, lens: std::ops::RangeInclusive<usize>) -> Result<(), Reject> {
    if lens.contains(&tok.len()) && tok.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        let (lo, hi) = lens.into_inner();
        Err(err(format!(
            "account must be {lo} to {hi} hex digits, got {}",
            show(tok)
        )))
    }
}

/// `MT` and `QXYZ` -> (qualifier, code).
fn full_event(mt: &str, qxyz: &str) -> Result<(u32, u32), Reject> {
    let mt = digits(mt, 2, "message type")?;
    if mt != 18 && mt != 98 {
        return Err(err(format!(
            "message type {mt:02} is not Contact ID (expected 18 or 98)"
        )));
    }
    let q = digits(qxyz.get(..1).unwrap_or(""), 1, "qualifier")?;
    let code = digits(qxyz.get(1..).unwrap_or(""), 3, "event code")?;
    if !matches!(q, 1 | 3 | 6) {
        return Err(err(format!(
            "qualifier {q} is not 1 (new), 3 (restore) or 6 (status)"
        )));
    }
    Ok((q, code))
}

/// `E130` / `R401` -> (qualifier, code).
fn receiver_event(tok: &str) -> Result<(u32, u32), Reject> {
    let q = match tok.get(..1) {
        Some("E" | "e") => 1,
        Some("R" | "r") => 3,
        _ => {
            return Err(err(format!(
                "expected `E` or `R` before the event code, got {}",
                show(tok)
            )));
        }
    };
    Ok((q, digits(tok.get(1..).unwrap_or(""), 3, "event code")?))
}

pub(crate) fn decode(text: &str) -> Result<Vec<Item>, Reject> {
    let toks: Vec<&str> = text.split_ascii_whitespace().collect();
    let piece = |t: &str, a: usize, b: usize| t.get(a..b).unwrap_or("").to_string();
    let (q, code, gg, ccc) = match toks.as_slice() {
        [one] if one.len() == 9 => {
            let (q, code) = receiver_event(&piece(one, 0, 4))?;
            (q, code, piece(one, 4, 6), piece(one, 6, 9))
        }
        [one] if one.len() == 15 || one.len() == 16 => {
            account(&piece(one, 0, 4), 4..=4)?;
            if one.len() == 16 {
                account(&piece(one, 15, 16), 1..=1)
                    .map_err(|_| err("checksum must be a hex digit".into()))?;
            }
            let (q, code) = full_event(&piece(one, 4, 6), &piece(one, 6, 10))?;
            (q, code, piece(one, 10, 12), piece(one, 12, 15))
        }
        [one] => {
            return Err(err(format!(
                "compact form must be 15 or 16 characters (AAAAMMQXYZGGCCC[K]) or 9 (E130GGCCC), got {}",
                one.chars().count()
            )));
        }
        [ev, gg, ccc] => {
            let (q, code) = receiver_event(ev)?;
            (q, code, gg.to_string(), ccc.to_string())
        }
        [acct, ev, gg, ccc] => {
            account(acct, 3..=10)?;
            let (q, code) = receiver_event(ev)?;
            (q, code, gg.to_string(), ccc.to_string())
        }
        [acct, mt, qxyz, gg, ccc] | [acct, mt, qxyz, gg, ccc, _] => {
            account(acct, 3..=10)?;
            if let Some(k) = toks.get(5) {
                account(k, 1..=1).map_err(|_| err("checksum must be one hex digit".into()))?;
            }
            let (q, code) = full_event(mt, qxyz)?;
            (q, code, gg.to_string(), ccc.to_string())
        }
        _ => {
            return Err(err(
                "unrecognized layout; expected `ACCT 18 QXYZ GG CCC`, `AAAA18QXYZGGCCC` or `E130 01 004`"
                    .into(),
            ));
        }
    };
    let partition = Some(digits(&gg, 2, "partition")?).filter(|p| *p != 0);
    let number = Some(digits(&ccc, 3, "zone/user")?).filter(|n| *n != 0);
    let letter = if q == 3 { 'R' } else { 'E' };
    let code_s = format!("CID:{letter}{code:03}");
    let new = q != 3;
    let (event_type, status, base) = match kind(code) {
        None => return Err(err(format!("event code {code:03} is not mapped"))),
        Some(Kind::Test) => {
            let what = if code == 601 { "manual" } else { "periodic" };
            return Ok(vec![Item::Ignored(format!(
                "{what} test report ({code_s}) not forwarded"
            ))]);
        }
        Some(Kind::OpenClose) => {
            // Q1 = opening = disarmed = CHeKT restore; Q3 = closing = armed = active.
            let (status, text) = match (new, code) {
                (true, 441) => (EventStatus::Restore, "Disarmed from stay"),
                (false, 441) => (EventStatus::Active, "Armed stay"),
                (true, 407) => (EventStatus::Restore, "Disarmed remotely"),
                (false, 407) => (EventStatus::Active, "Armed remotely"),
                (true, _) => (EventStatus::Restore, "Disarmed"),
                (false, _) => (EventStatus::Active, "Armed"),
            };
            (EventType::Arming, status, text.to_string())
        }
        Some(Kind::Bypass) => {
            let (status, text) = if new {
                (EventStatus::Active, "Zone bypassed")
            } else {
                (EventStatus::Restore, "Zone unbypassed")
            };
            (EventType::Arming, status, text.to_string())
        }
        Some(k) => {
            let t = if k == Kind::Alarm {
                EventType::Alarm
            } else {
                EventType::Trouble
            };
            if new {
                (t, EventStatus::Active, label(code).to_string())
            } else {
                (t, EventStatus::Restore, format!("{} restored", label(code)))
            }
        }
    };
    let text = if q == 6 {
        format!("{base} (status report)")
    } else {
        base
    };
    let mut d = Decoded::new(event_type, status, text);
    d.partition = partition;
    if kind(code) == Some(Kind::OpenClose) {
        d.user = number;
    } else {
        d.zone = number;
    }
    d.code = Some(code_s);
    Ok(vec![Item::Event(d)])
}
