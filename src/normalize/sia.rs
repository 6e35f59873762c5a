//! SIA DC-03 decoder (two-letter event codes). It owns the accepted layout and the code
//! table; it never looks at the site.
//!
//! Layout: an optional account block `#ACCT|` (1-16 hex digits), then elements separated by
//! `/`. A leading `N` (new event block) on an element is skipped. An element holds
//! modifiers and codes: `ri<n>` partition (area), `id<n>` user, `pi<n>` peripheral and
//! `ti<hh:mm>` time (both skipped), and codes — two capital letters, optional spaces, an
//! optional number of up to 9 digits: `BA004`, `BA4`, `BA 4`, `Nri1/BA004/BH005`,
//! `#1234|Nri1/BA004`. Modifiers apply to the codes after them.
//!
//! Invariants: the number after a code is the zone, except for `OP`/`CL`/`CG` where it is
//! the user; 0 means none (as does `ri0`). `OP` (opening) is arming `restore` (disarmed),
//! `CL`/`CG` (closing, partial closing) arming `active`. `RP` automatic tests are ignored;
//! an unknown code rejects the whole message, naming it. At most 100 events per message.

use super::{Decoded, Item, MAX_EVENTS, Reject, show};
use crate::event::{EventStatus, EventType};

use EventStatus::{Active, Restore};
use EventType::{Alarm, Arming, Trouble};

/// (type, status, label, number is a user rather than a zone), or `None` for `RP`.
type Meaning = Option<(EventType, EventStatus, &'static str, bool)>;

fn meaning(code: &str) -> Result<Meaning, Reject> {
    Ok(Some(match code {
        "BA" => (Alarm, Active, "Burglary alarm", false),
        "BH" => (Alarm, Restore, "Burglary alarm restored", false),
        "FA" => (Alarm, Active, "Fire alarm", false),
        "FH" => (Alarm, Restore, "Fire alarm restored", false),
        "PA" => (Alarm, Active, "Panic alarm", false),
        "PH" => (Alarm, Restore, "Panic alarm restored", false),
        "HA" => (Alarm, Active, "Hold-up alarm", false),
        "HH" => (Alarm, Restore, "Hold-up alarm restored", false),
        "TA" => (Alarm, Active, "Tamper alarm", false),
        "TR" => (Alarm, Restore, "Tamper alarm restored", false),
        "AT" => (Trouble, Active, "AC power trouble", false),
        "AR" => (Trouble, Restore, "AC power restored", false),
        "YT" => (Trouble, Active, "Battery trouble", false),
        "YR" => (Trouble, Restore, "Battery trouble restored", false),
        "YC" => (Trouble, Active, "Communication failure", false),
        "YK" => (Trouble, Restore, "Communication restored", false),
        "BB" => (Arming, Active, "Zone bypassed", false),
        "BU" => (Arming, Restore, "Zone unbypassed", false),
        "OP" => (Arming, Restore, "Disarmed", true),
        "CL" => (Arming, Active, "Armed", true),
        "CG" => (Arming, Active, "Armed partially", true),
        "RP" => return Ok(None),
        other => return Err(Reject::Sia(format!("unknown event code `{other}`"))),
    }))
}

/// Digits starting at `at`: (value or None when there are none, index after them).
fn number(el: &str, at: usize) -> Result<(Option<u32>, usize), Reject> {
    let b = el.as_bytes();
    let mut end = at;
    while b.get(end).is_some_and(u8::is_ascii_digit) {
        end += 1;
    }
    let ds = el.get(at..end).unwrap_or("");
    if ds.is_empty() {
        return Ok((None, end));
    }
    if ds.len() > 9 {
        return Err(Reject::Sia(format!(
            "number {} is too long (at most 9 digits)",
            show(ds)
        )));
    }
    Ok((ds.parse().ok(), end))
}

pub(crate) fn decode(text: &str) -> Result<Vec<Item>, Reject> {
    let mut rest = text.trim();
    if let Some(after) = rest.strip_prefix('#') {
        let (acct, tail) = after
            .split_once('|')
            .ok_or_else(|| Reject::Sia("account block `#ACCT` must end with `|`".into()))?;
        if acct.is_empty() || acct.len() > 16 || !acct.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Reject::Sia(format!(
                "account must be 1 to 16 hex digits, got {}",
                show(acct)
            )));
        }
        rest = tail;
    }
    let mut partition = None;
    let mut user = None;
    let mut items = Vec::new();
    let mut events = 0;
    for raw in rest.split('/') {
        let el = raw.trim();
        let el = el.strip_prefix('N').unwrap_or(el);
        let b = el.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if b.get(i) == Some(&b' ') {
                i += 1;
                continue;
            }
            let two = el.get(i..i + 2).unwrap_or("");
            match two {
                "ri" | "id" | "pi" => {
                    let (n, end) = number(el, i + 2)?;
                    let n =
                        n.ok_or_else(|| Reject::Sia(format!("modifier `{two}` needs a number")))?;
                    match two {
                        "ri" => partition = Some(n).filter(|p| *p != 0),
                        "id" => user = Some(n).filter(|u| *u != 0),
                        _ => {}
                    }
                    i = end;
                }
                "ti" => {
                    i += 2;
                    while b.get(i).is_some_and(|c| c.is_ascii_digit() || *c == b':') {
                        i += 1;
                    }
                }
                _ if two.len() == 2 && two.bytes().all(|c| c.is_ascii_uppercase()) => {
                    let m = meaning(two)?;
                    let mut j = i + 2;
                    while b.get(j) == Some(&b' ') {
                        j += 1;
                    }
                    let (n, end) = number(el, j)?;
                    i = end;
                    let Some((event_type, status, label, is_user)) = m else {
                        items.push(Item::Ignored(format!(
                            "automatic test report (SIA:{two}) not forwarded"
                        )));
                        continue;
                    };
                    let n = n.filter(|n| *n != 0);
                    let mut d = Decoded::new(event_type, status, label);
                    d.partition = partition;
                    if is_user {
                        d.user = n.or(user);
                    } else {
                        d.zone = n;
                    }
                    d.code = Some(format!("SIA:{two}"));
                    items.push(Item::Event(d));
                    events += 1;
                    if events > MAX_EVENTS {
                        return Err(Reject::Sia(format!(
                            "more than {MAX_EVENTS} events in one message"
                        )));
                    }
                }
                _ => {
                    let at = el.get(i..).unwrap_or("");
                    return Err(Reject::Sia(format!(
                        "unrecognized element {}; expected a code like `BA004` or `ri1`",
                        show(at)
                    )));
                }
            }
        }
    }
    if items.is_empty() {
        return Err(Reject::Sia(
            "no event code found (expected e.g. `BA004` or `Nri1/BA004`)".into(),
        ));
    }
    Ok(items)
}
