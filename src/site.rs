//! Local site configuration: panel zones, cameras and topic rules, kept on the device.
//!
//! The site file (`site.toml`, path set in the agent configuration) is read at start and on
//! SIGHUP. It is the only place that says which CHeKT location a topic belongs to, what a
//! zone is called and which cameras watch it.
//!
//! Invariants:
//! - This module parses and validates; it never sends anything anywhere. Fields such as
//!   `rtsp_url`, `username`, `password` and `notes` are accepted so installers can keep one
//!   file for the site, but normalize copies only zone names/types and camera *ids* into
//!   events. `Debug` of a camera redacts its secrets.
//! - A site file that fails validation is rejected whole; a running agent keeps the
//!   previous one.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// Decoder a topic rule selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// The agent's own JSON event schema (see README).
    Json,
    /// Ademco Contact ID strings (`ACCT 18 QXYZ GG CCC` or `E130 01 004`).
    ContactId,
    /// SIA DC-03 two-letter codes (`BA004`, `Nri1/BA004`, `BA 4`).
    Sia,
}

/// Maps MQTT topics to a device (and optionally a zone) and a decoder.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    /// MQTT topic filter (`+` and `#` wildcards). Also subscribed to.
    pub filter: String,
    pub format: Format,
    /// Device id: a literal, or `{N}` for the N-th `+` wildcard's segment (1-based).
    pub device: String,
    /// Optional zone number: a literal number or `{N}`, used when the payload has none.
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Camera {
    /// NVR channel number.
    pub channel: u32,
    /// CHeKT camera id.
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Local stream address. Never sent.
    #[serde(default)]
    pub rtsp_url: Option<String>,
    /// Local credentials. Never sent.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

impl fmt::Debug for Camera {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Camera")
            .field("channel", &self.channel)
            .field("id", &self.id)
            .field("name", &self.name)
            .field("rtsp_url", &self.rtsp_url.as_ref().map(|_| "<redacted>"))
            .field("username", &self.username.as_ref().map(|_| "<redacted>"))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub number: u32,
    pub name: String,
    #[serde(default, rename = "type")]
    pub zone_type: Option<String>,
    #[serde(default)]
    pub partition: Option<u32>,
    /// Channels of the cameras that watch this zone.
    #[serde(default)]
    pub cameras: Vec<u32>,
    /// Installer's notes. Never sent.
    #[serde(default)]
    pub notes: Option<String>,
}

/// The whole site file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// CHeKT location id of this site.
    pub location_id: String,
    /// CHeKT recorder id, if the site has one.
    #[serde(default)]
    pub recorder_id: Option<String>,
    #[serde(default, rename = "camera")]
    pub cameras: Vec<Camera>,
    #[serde(default, rename = "zone")]
    pub zones: Vec<Zone>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<TopicRule>,
}

/// Why a site file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("cannot read site file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("site file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("site file {path}: key `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

impl SiteError {
    /// The dotted key the error concerns, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            SiteError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

impl SiteConfig {
    /// Read and validate a site file.
    pub fn load(path: &Path) -> Result<SiteConfig, SiteError> {
        let text = std::fs::read_to_string(path).map_err(|source| SiteError::Read {
            path: path.display().to_string(),
            source,
        })?;
        SiteConfig::parse(&text, &path.display().to_string())
    }

    /// Parse and validate site TOML; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<SiteConfig, SiteError> {
        let site: SiteConfig = toml::from_str(text).map_err(|e| SiteError::Parse {
            path: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        site.validate(origin)?;
        Ok(site)
    }

    fn validate(&self, origin: &str) -> Result<(), SiteError> {
        let invalid = |key: String, message: String| SiteError::Invalid {
            path: origin.to_string(),
            key,
            message,
        };
        if self.location_id.trim().is_empty() {
            return Err(invalid("location_id".into(), "must not be empty".into()));
        }
        let mut channels = BTreeMap::new();
        for (i, c) in self.cameras.iter().enumerate() {
            if c.id.trim().is_empty() {
                return Err(invalid(
                    format!("camera[{i}].id"),
                    "must not be empty".into(),
                ));
            }
            if channels.insert(c.channel, i).is_some() {
                return Err(invalid(
                    format!("camera[{i}].channel"),
                    format!("channel {} is listed twice", c.channel),
                ));
            }
        }
        let mut zones = BTreeMap::new();
        for (i, z) in self.zones.iter().enumerate() {
            if zones.insert(z.number, i).is_some() {
                return Err(invalid(
                    format!("zone[{i}].number"),
                    format!("zone {} is listed twice", z.number),
                ));
            }
            for ch in &z.cameras {
                if !channels.contains_key(ch) {
                    return Err(invalid(
                        format!("zone[{i}].cameras"),
                        format!("camera channel {ch} is not defined in any [[camera]]"),
                    ));
                }
            }
        }
        if self.rules.is_empty() {
            return Err(invalid(
                "rule".into(),
                "at least one [[rule]] is needed to map topics to devices".into(),
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let wildcards =
                validate_filter(&r.filter).map_err(|m| invalid(format!("rule[{i}].filter"), m))?;
            check_template(&r.device, wildcards, false)
                .map_err(|m| invalid(format!("rule[{i}].device"), m))?;
            if let Some(z) = &r.zone {
                check_template(z, wildcards, true)
                    .map_err(|m| invalid(format!("rule[{i}].zone"), m))?;
            }
        }
        Ok(())
    }

    pub fn zone(&self, number: u32) -> Option<&Zone> {
        self.zones.iter().find(|z| z.number == number)
    }

    pub fn camera(&self, channel: u32) -> Option<&Camera> {
        self.cameras.iter().find(|c| c.channel == channel)
    }

    /// Topic filters to subscribe to, one per rule, deduplicated, in rule order.
    pub fn filters(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for r in &self.rules {
            if !out.contains(&r.filter) {
                out.push(r.filter.clone());
            }
        }
        out
    }

    /// The first rule whose filter matches `topic`, with the segments its `+` wildcards
    /// matched.
    pub fn match_topic<'a>(&self, topic: &'a str) -> Option<(&TopicRule, Vec<&'a str>)> {
        self.rules
            .iter()
            .find_map(|r| topic_matches(&r.filter, topic).map(|caps| (r, caps)))
    }
}

/// Checks an MQTT topic filter; returns how many `+` wildcards it has.
fn validate_filter(filter: &str) -> Result<usize, String> {
    if filter.is_empty() {
        return Err("must not be empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let mut plus = 0;
    for (i, l) in levels.iter().enumerate() {
        if *l == "+" {
            plus += 1;
        } else if *l == "#" {
            if i != levels.len() - 1 {
                return Err(format!("`#` must be the last level in {filter:?}"));
            }
        } else if l.contains('+') || l.contains('#') {
            return Err(format!(
                "wildcards must fill a whole level in {filter:?} (level {l:?})"
            ));
        }
    }
    Ok(plus)
}

fn check_template(t: &str, wildcards: usize, numeric: bool) -> Result<(), String> {
    if let Some(inner) = t.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        let n: usize = inner
            .parse()
            .map_err(|_| format!("{t:?} is not a literal or {{N}}"))?;
        if n == 0 || n > wildcards {
            return Err(format!(
                "{t:?} refers to wildcard {n} but the filter has {wildcards} `+` wildcard(s)"
            ));
        }
        return Ok(());
    }
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    if numeric && t.parse::<u32>().is_err() {
        return Err(format!("{t:?} is not a zone number or {{N}}"));
    }
    Ok(())
}

/// MQTT filter matching; returns the segments matched by `+` wildcards.
pub fn topic_matches<'a>(filter: &str, topic: &'a str) -> Option<Vec<&'a str>> {
    let mut caps = Vec::new();
    let mut t = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return Some(caps),
            "+" => caps.push(t.next()?),
            lit => {
                if t.next()? != lit {
                    return None;
                }
            }
        }
    }
    if t.next().is_some() { None } else { Some(caps) }
}

/// Resolves a rule template (`literal` or `{N}`) against wildcard captures.
pub fn resolve_template<'a>(template: &'a str, caps: &[&'a str]) -> Option<&'a str> {
    match template
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) => caps.get(n.checked_sub(1)?).copied(),
        None => Some(template),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: &str = r#"
location_id = "Z6RSOG"
recorder_id = "Z6RANV"

[[camera]]
channel = 1
id = "cam-1"
rtsp_url = "rtsp://admin:hunter2@10.0.0.5/ch1"

[[zone]]
number = 4
name = "Front door"
type = "entry_exit"
partition = 1
cameras = [1]

[[rule]]
filter = "site/panel/+/cid"
format = "contact_id"
device = "{1}"
"#;

    #[test]
    fn parses_and_matches() {
        let s = SiteConfig::parse(SITE, "site.toml").unwrap();
        let (rule, caps) = s.match_topic("site/panel/p1/cid").unwrap();
        assert_eq!(resolve_template(&rule.device, &caps), Some("p1"));
        assert!(s.match_topic("site/panel/p1/cid/x").is_none());
        assert!(topic_matches("a/#", "a/b/c").is_some());
    }

    #[test]
    fn debug_redacts_camera_secrets() {
        let s = SiteConfig::parse(SITE, "site.toml").unwrap();
        let d = format!("{s:?}");
        assert!(!d.contains("hunter2"), "{d}");
    }

    #[test]
    fn rejects_unknown_camera_and_bad_template() {
        let bad = SITE.replace("cameras = [1]", "cameras = [9]");
        let e = SiteConfig::parse(&bad, "site.toml").unwrap_err();
        assert_eq!(e.key(), Some("zone[0].cameras"));
        let bad = SITE.replace("device = \"{1}\"", "device = \"{2}\"");
        let e = SiteConfig::parse(&bad, "site.toml").unwrap_err();
        assert_eq!(e.key(), Some("rule[0].device"));
    }
}
