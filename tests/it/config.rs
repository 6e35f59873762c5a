//! Every class of configuration error exits 78 (EX_CONFIG) with a message that names the
//! file, the key and what is wrong — before anything starts.

use std::path::Path;

use chekt_agent::keys::DeviceKey;

use crate::support::{agent, scratch};

const BASE: &str = r#"site_file = "site.toml"
state_dir = "state"

[mqtt]
host = "127.0.0.1"
port = 1883

[chekt]
api_url = "https://api.chektdev.com"
auth = "assertion"
client_id = "gw-0001"
token_url = "https://tenant.example/oauth/token"
"#;

fn setup(dir: &Path, config: &str) -> String {
    std::fs::write(dir.join("site.toml"), chekt_agent::testbed::SITE_TOML).unwrap();
    let key = dir.join("state/keys/device.key");
    if !key.exists() {
        DeviceKey::generate_es256()
            .unwrap()
            .write_new(&key)
            .unwrap();
    }
    let p = dir.join("agent.toml");
    std::fs::write(&p, config).unwrap();
    p.to_str().unwrap().to_string()
}

fn expect_78(config: &str, must_contain: &[&str]) {
    let (_d, dir) = scratch();
    let path = setup(&dir, config);
    let (code, out, err) = agent(&["check-config", "--config", &path]);
    assert_eq!(code, 78, "config:\n{config}\nstdout: {out}\nstderr: {err}");
    for m in must_contain {
        assert!(err.contains(m), "stderr lacks {m:?}: {err}");
    }
    // `run` refuses the same way, before creating the spool.
    let (code, _, err2) = agent(&["run", "--config", &path]);
    assert_eq!(code, 78, "{err2}");
    assert!(!dir.join("state/spool").exists(), "nothing started");
}

#[test]
fn valid_config_passes() {
    let (_d, dir) = scratch();
    let path = setup(&dir, BASE);
    let (code, out, err) = agent(&["check-config", "--config", &path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("config OK") && out.contains("Z6RSOG"), "{out}");
}

#[test]
fn example_config_in_repo_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/agent.example.toml"
    ))
    .unwrap();
    let cfg = chekt_agent::config::Config::parse(&text, Path::new("/etc/chekt-agent/agent.toml"))
        .expect("the documented example parses");
    assert_eq!(cfg.spool.max_bytes, 64 * 1024 * 1024);
    let site = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/site.example.toml"
    ))
    .unwrap();
    chekt_agent::site::SiteConfig::parse(&site, "site.example.toml")
        .expect("the example site parses");
}

#[test]
fn missing_file() {
    let (code, _, err) = agent(&["check-config", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(code, 78);
    assert!(
        err.contains("cannot read config file /nonexistent/agent.toml"),
        "{err}"
    );
}

#[test]
fn toml_syntax_error() {
    expect_78(&format!("{BASE}\n[spool\n"), &["agent.toml", "line"]);
}

#[test]
fn unknown_key() {
    expect_78(
        &BASE.replace("port = 1883", "port = 1883\nprot = 1"),
        &["unknown field", "prot"],
    );
}

#[test]
fn wrong_type() {
    expect_78(
        &BASE.replace("port = 1883", "port = \"mqtt\""),
        &["agent.toml", "port"],
    );
}

#[test]
fn out_of_range_value() {
    expect_78(
        &BASE.replace("port = 1883", "port = 0"),
        &["key `mqtt.port`", "1-65535"],
    );
    expect_78(
        &format!("{BASE}\n[spool]\nmax_bytes = 10\n"),
        &["key `spool.max_bytes`", "at least"],
    );
    expect_78(
        &format!("{BASE}assertion_lifetime_secs = 600\n"),
        &["chekt.assertion_lifetime_secs", "5 minutes"],
    );
}

#[test]
fn missing_required_key() {
    expect_78(
        &BASE.replace("client_id = \"gw-0001\"\n", ""),
        &["chekt.client_id", "required"],
    );
}

#[test]
fn insecure_url() {
    expect_78(
        &BASE.replace("https://api.chektdev.com", "http://api.chektdev.com"),
        &["chekt.api_url", "https://"],
    );
}

#[test]
fn bad_enum() {
    expect_78(
        &BASE.replace("auth = \"assertion\"", "auth = \"password\""),
        &["chekt.auth", "\"password\""],
    );
}

#[test]
fn tenant_audience_without_slash() {
    expect_78(
        &format!("{BASE}tenant_audience = \"https://tenant.example\"\n"),
        &["chekt.tenant_audience", "trailing slash"],
    );
}

#[test]
fn bad_log_level() {
    expect_78(
        &format!("{BASE}\n[log]\nlevel = \"loud[\"\n"),
        &["log.level"],
    );
}

#[test]
fn missing_ca_file() {
    expect_78(
        &format!("{BASE}ca_file = \"nope.pem\"\n"),
        &["chekt.ca_file", "does not exist"],
    );
}

#[test]
fn missing_site_file() {
    expect_78(
        &BASE.replace("site.toml", "other-site.toml"),
        &["cannot read site file", "other-site.toml"],
    );
}

#[test]
fn invalid_site_file() {
    let (_d, dir) = scratch();
    let path = setup(&dir, BASE);
    let bad = chekt_agent::testbed::SITE_TOML.replace("cameras = [1, 2]", "cameras = [1, 7]");
    std::fs::write(dir.join("site.toml"), bad).unwrap();
    let (code, _, err) = agent(&["check-config", "--config", &path]);
    assert_eq!(code, 78);
    assert!(
        err.contains("zone[0].cameras") && err.contains("channel 7"),
        "{err}"
    );
}

#[test]
fn missing_key() {
    let (_d, dir) = scratch();
    let path = setup(&dir, BASE);
    std::fs::remove_file(dir.join("state/keys/device.key")).unwrap();
    let (code, _, err) = agent(&["check-config", "--config", &path]);
    assert_eq!(code, 78);
    assert!(
        err.contains("no device key") && err.contains("key generate"),
        "{err}"
    );
}

#[test]
fn garbage_key() {
    let (_d, dir) = scratch();
    let path = setup(&dir, BASE);
    let k = dir.join("state/keys/device.key");
    std::fs::write(&k, "not a key").unwrap();
    let (code, _, err) = agent(&["check-config", "--config", &path]);
    assert_eq!(code, 78);
    assert!(err.contains("BEGIN PRIVATE KEY"), "{err}");
}

#[test]
fn usage_error_is_2() {
    let (code, _, _) = agent(&["frobnicate"]);
    assert_eq!(code, 2);
}

#[test]
fn key_commands_generate_show_rotate() {
    let (_d, dir) = scratch();
    let kd = dir.join("keys");
    let kds = kd.to_str().unwrap();
    let (code, out, err) = agent(&["key", "generate", "--key-dir", kds]);
    assert_eq!(code, 0, "{err}");
    let jwk_text: String = out.lines().filter(|l| !l.starts_with('#')).collect();
    let jwk: serde_json::Value = serde_json::from_str(&jwk_text).unwrap();
    assert_eq!(jwk["kty"], "EC");
    assert!(jwk.get("d").is_none(), "private part never printed");
    let (code, _, err) = agent(&["key", "generate", "--key-dir", kds]);
    assert_eq!(code, 78, "refuses to overwrite: {err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
    let (code, out, _) = agent(&["key", "rotate", "--key-dir", kds]);
    assert_eq!(code, 0);
    assert!(out.contains("next key"), "{out}");
    let (code, _, err) = agent(&["key", "rotate", "--key-dir", kds]);
    assert_eq!(code, 78, "a second staged key is refused: {err}");
    let (code, out, _) = agent(&["key", "show", "--key-dir", kds]);
    assert_eq!(code, 0);
    assert!(
        out.contains("current key") && out.contains("staged next key"),
        "{out}"
    );
    let private = std::fs::read_to_string(kd.join("device.key")).unwrap();
    let body: String = private
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!out.contains(&body[..40]));
}
