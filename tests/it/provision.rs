//! `chekt-agent provision`, run as the real binary in a scratch directory: creates the key
//! (0600), the configuration and the site file, prints the JWK; a second run changes no
//! byte; a different key is refused; bad input exits 78 naming the key and writes nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use crate::support::{BIN, agent, scratch};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const TOKEN_URL: &str = "https://gw-tenant.example.com/oauth/token";

/// The provision command line for a scratch directory; `set` replaces or adds flags.
fn provision(dir: &Path, set: &[(&str, &str)]) -> (i32, String, String) {
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let mut flags: Vec<(String, String)> = [
        ("--config", d("etc/agent.toml")),
        ("--site", d("etc/site.toml")),
        ("--state-dir", d("state")),
        ("--key-path", d("etc/device.key")),
        ("--client-id", "gw-0001".into()),
        ("--token-url", TOKEN_URL.into()),
        ("--location-id", "Z6RSOG".into()),
        ("--recorder-id", "Z6RANV".into()),
    ]
    .into_iter()
    .map(|(f, v)| (f.to_string(), v))
    .collect();
    for (f, v) in set {
        match flags.iter_mut().find(|(g, _)| g == f) {
            Some(slot) => slot.1 = v.to_string(),
            None => flags.push((f.to_string(), v.to_string())),
        }
    }
    let mut args = vec!["provision"];
    for (f, v) in &flags {
        args.push(f);
        args.push(v);
    }
    agent(&args)
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
    ["etc/agent.toml", "etc/site.toml", "etc/device.key"]
        .iter()
        .map(|f| {
            let p = dir.join(f);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            (f.to_string(), std::fs::read(&p).unwrap(), mode)
        })
        .collect()
}

fn kid_line(stdout: &str) -> &str {
    stdout
        .lines()
        .find(|l| l.starts_with("# device key: kid "))
        .unwrap_or_else(|| panic!("no kid line in {stdout}"))
}

#[test]
fn first_run_creates_everything_second_run_changes_nothing() {
    let (_d, dir) = scratch();
    let (code, out, err) = provision(&dir, &[]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    // The public JWK, ready to register, and never the private key.
    let jwk_text: String = out.lines().skip(1).collect::<Vec<_>>().join("\n");
    let jwk: serde_json::Value = serde_json::from_str(&jwk_text).expect("JWK on stdout");
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["alg"], "ES256");
    assert!(kid_line(&out).contains(jwk["kid"].as_str().unwrap()));
    assert!(jwk.get("d").is_none(), "private member printed: {out}");
    assert!(!out.contains("PRIVATE KEY") && !err.contains("PRIVATE KEY"));
    assert!(err.contains("config OK"), "{err}");

    let first = files(&dir);
    assert_eq!(first[2].2, 0o600, "key mode");
    assert_eq!(first[0].2, 0o640, "config mode");
    assert_eq!(first[1].2, 0o640, "site mode");
    let config = String::from_utf8(first[0].1.clone()).unwrap();
    assert!(config.contains("client_id = \"gw-0001\""), "{config}");
    assert!(config.contains(&format!("token_url = \"{TOKEN_URL}\"")));
    // Created from the documented example: its comments are there.
    assert!(config.contains("# Partner Event API."), "{config}");
    let site = String::from_utf8(first[1].1.clone()).unwrap();
    assert!(site.contains("location_id = \"Z6RSOG\"") && site.contains("recorder_id = \"Z6RANV\""));

    // The agent accepts it, taking the key as the systemd credential (as the unit does).
    let cc = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(dir.join("etc/agent.toml"))
        .env("CREDENTIALS_DIRECTORY", dir.join("etc"))
        .output()
        .unwrap();
    let cc_out = String::from_utf8_lossy(&cc.stdout);
    assert!(
        cc.status.success(),
        "{cc_out}{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    assert!(
        cc_out.contains(&format!(
            "device key: {}",
            dir.join("etc/device.key").display()
        )),
        "{cc_out}"
    );

    // Same arguments again: same key, not one byte changed.
    let (code, out2, err2) = provision(&dir, &[]);
    assert_eq!(code, 0, "{out2}{err2}");
    assert_eq!(kid_line(&out), kid_line(&out2));
    assert!(err2.contains("unchanged"), "{err2}");
    assert_eq!(first, files(&dir), "a re-run changed a file");
}

#[test]
fn edits_only_the_given_keys_of_an_existing_config() {
    let (_d, dir) = scratch();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    let before = format!(
        "# site-specific notes\nsite_file = \"{}\"\nstate_dir = \"{}\"\n\n[mqtt]\nport = 1884   # the NVR's broker\n\n[chekt]\napi_url = \"https://api.chektdev.com\"\nclient_id = \"old-id\"  # from the work order\ntoken_url = \"{TOKEN_URL}\"\n\n[log]\nlevel = \"debug\"\n",
        dir.join("etc/site.toml").display(),
        dir.join("state").display()
    );
    std::fs::write(dir.join("etc/agent.toml"), &before).unwrap();
    std::fs::set_permissions(
        dir.join("etc/agent.toml"),
        std::fs::Permissions::from_mode(0o604),
    )
    .unwrap();
    let (code, out, err) = provision(&dir, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let after = std::fs::read_to_string(dir.join("etc/agent.toml")).unwrap();
    assert_eq!(
        after,
        before.replace("client_id = \"old-id\"", "client_id = \"gw-0001\""),
        "only chekt.client_id may change"
    );
    assert!(err.contains("set chekt.client_id"), "{err}");
    let mode = std::fs::metadata(dir.join("etc/agent.toml"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o604, "an edited file keeps its mode");
}

#[test]
fn rsa_import_is_idempotent_and_a_different_key_is_refused() {
    let rsa = format!("{FIXTURES}/rsa2048.pem");
    let (_d, dir) = scratch();
    let (code, out, err) = provision(&dir, &[("--rsa", &rsa)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(kid_line(&out).contains("RS256"), "{out}");
    let first = files(&dir);
    let (code, out2, err) = provision(&dir, &[("--rsa", &rsa)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(kid_line(&out), kid_line(&out2));
    assert_eq!(first, files(&dir));

    // An ES256 key exists; importing the RSA key over it is refused, nothing changes.
    let (_d2, dir2) = scratch();
    assert_eq!(provision(&dir2, &[]).0, 0);
    let before = files(&dir2);
    let (code, _, err) = provision(&dir2, &[("--rsa", &rsa)]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("refusing to replace"), "{err}");
    assert!(err.contains(&dir2.join("etc/device.key").display().to_string()));
    assert_eq!(before, files(&dir2));
}

#[test]
fn bad_input_exits_78_naming_the_key_and_writes_nothing() {
    let (_d, dir) = scratch();
    let (code, _, err) = provision(
        &dir,
        &[("--token-url", "http://gw-tenant.example.com/oauth/token")],
    );
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("chekt.token_url"), "{err}");
    assert!(err.contains("https://"), "{err}");
    assert!(
        !dir.join("etc").exists(),
        "bad input must not write anything"
    );

    // The example's placeholder client id is not a provisioned gateway.
    let (_d, dir) = scratch();
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let (code, _, err) = agent(&[
        "provision",
        "--config",
        &d("agent.toml"),
        "--site",
        &d("site.toml"),
        "--state-dir",
        &d("state"),
        "--key-path",
        &d("device.key"),
        "--token-url",
        TOKEN_URL,
        "--location-id",
        "Z6RSOG",
    ]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("chekt.client_id") && err.contains("--client-id"),
        "{err}"
    );
}

#[test]
fn existing_site_file_is_never_rewritten() {
    let (_d, dir) = scratch();
    assert_eq!(provision(&dir, &[]).0, 0);
    let site = dir.join("etc/site.toml");
    let custom = chekt_agent::testbed::SITE_TOML;
    std::fs::write(&site, custom).unwrap();
    let (code, _, err) = provision(&dir, &[("--location-id", "OTHER1")]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("location_id") && err.contains("OTHER1"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&site).unwrap(), custom);
}

#[test]
fn exposed_key_is_refused_with_the_fix() {
    let (_d, dir) = scratch();
    assert_eq!(provision(&dir, &[]).0, 0);
    let key = dir.join("etc/device.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = provision(&dir, &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("chmod 600"), "{err}");
}

/// The kid in a `# <label>: kid <kid> (<alg>)` line.
fn kid_after<'a>(stdout: &'a str, label: &str) -> &'a str {
    let prefix = format!("# {label}: kid ");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {label:?} line in {stdout}"))
}

/// On a provisioned gateway, run by hand (no systemd credential): `check-config`,
/// `key show` and `key rotate` use the installed key beside the configuration, the key
/// the service gets as its credential. The next key is staged in the key directory and,
/// when root stages it, given to the owner of the state directory (the service user;
/// `nobody` here) so the service can read and promote it.
#[test]
fn key_commands_by_hand_use_the_installed_key_and_stage_for_the_service_user() {
    use std::os::unix::fs::MetadataExt;
    let (_d, dir) = scratch();
    let (code, out, err) = provision(&dir, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let kid = kid_after(&out, "device key").to_string();
    let config = dir.join("etc/agent.toml");
    let config = config.to_str().unwrap();
    let (code, cc, err) = agent(&["check-config", "--config", config]);
    assert_eq!(code, 0, "{cc}{err}");
    let installed = dir.join("etc/device.key");
    assert!(
        cc.contains(&format!("device key: {} kid {kid}", installed.display())),
        "{cc}"
    );

    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    if root {
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    } else {
        eprintln!("not root: the hand-over to the service user is not checked");
    }
    let (code, rot, err) = agent(&["key", "rotate", "--config", config]);
    assert_eq!(code, 0, "{rot}{err}");
    let next_kid = kid_after(&rot, "next key").to_string();
    assert_ne!(next_kid, kid);
    assert!(err.contains(&format!("retire kid {kid}")), "{err}");
    let staged = state.join("keys/device.next.key");
    let meta = std::fs::metadata(&staged).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    if root {
        let keys = std::fs::metadata(state.join("keys")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "staged key owner");
        assert_eq!(
            (keys.uid(), keys.gid()),
            (65534, 65534),
            "key directory owner"
        );
    }

    let (code, show, err) = agent(&["key", "show", "--config", config]);
    assert_eq!(code, 0, "{show}{err}");
    assert_eq!(kid_after(&show, "current key"), kid);
    assert_eq!(kid_after(&show, "staged next key"), next_kid);
    let (code, cc, err) = agent(&["check-config", "--config", config]);
    assert_eq!(code, 0, "{cc}{err}");
    assert!(
        cc.contains(&format!("staged next key: kid {next_kid}")),
        "{cc}"
    );
    // A second rotation without --replace is refused: two keys live at most.
    let (code, _, err) = agent(&["key", "rotate", "--config", config]);
    assert_ne!(code, 0);
    assert!(err.contains("device.next.key"), "{err}");
}

/// A key provisioned away from the configuration's directory is written into it as
/// `chekt.key_file`, so the commands run by hand still find it.
#[test]
fn a_key_elsewhere_is_named_in_the_configuration() {
    let (_d, dir) = scratch();
    let elsewhere = dir.join("secrets/gw.key");
    let (code, out, err) = provision(&dir, &[("--key-path", elsewhere.to_str().unwrap())]);
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(dir.join("etc/agent.toml")).unwrap();
    assert!(
        text.contains(&format!("key_file = \"{}\"", elsewhere.display())),
        "{text}"
    );
    let config = dir.join("etc/agent.toml");
    let (code, show, err) = agent(&["key", "show", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{show}{err}");
    assert_eq!(
        kid_after(&show, "current key"),
        kid_after(&out, "device key")
    );
}
