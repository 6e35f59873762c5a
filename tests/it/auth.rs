//! Assertion-token auth against the simulator over real TLS: tokens obtained, cached,
//! refreshed on 401; the simulator's replay and lifetime checks; a clock at 1970; a wrong
//! key; key file permissions; two-phase rotation.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use chekt_agent::auth::{AuthError, TokenSource};
use chekt_agent::clock::Clock;
use chekt_agent::keys::{DeviceKey, KeyStore};
use chekt_agent::simulator::SimConfig;
use chekt_agent::testbed::{AgentKnobs, CLIENT_ID, Testbed};

use crate::support::agent;

async fn testbed() -> Testbed {
    Testbed::start(SimConfig::default(), None, AgentKnobs::default())
        .await
        .unwrap()
}

fn source(tb: &Testbed, clock: Clock) -> TokenSource {
    let (cfg, _) = tb.config().unwrap();
    let http = chekt_agent::upload::http_client(&cfg.chekt).unwrap();
    TokenSource::new(&cfg.chekt.auth, http, Arc::new(clock)).with_key_store(tb.key_store())
}

/// POST an event with `bearer` straight to the simulator; returns the status.
async fn post_event(tb: &Testbed, bearer: &str, key: &str) -> u16 {
    let (cfg, _) = tb.config().unwrap();
    let http = chekt_agent::upload::http_client(&cfg.chekt).unwrap();
    let body = serde_json::json!({"version":"1.0","location_id":"Z6RSOG","event_id":key,"event_type":"alarm","event_status":"active"});
    http.post(cfg.chekt.events_url())
        .header("Authorization", bearer)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn token_obtained_used_and_cached() {
    let tb = testbed().await;
    let ts = source(&tb, Clock::system());
    let t1 = ts.bearer().await.unwrap();
    let t2 = ts.bearer().await.unwrap();
    assert_eq!(t1, t2, "the cached token is reused");
    assert_eq!(tb.sim.stats().token_ok, 1);
    assert_eq!(post_event(&tb, &t1.header_value(), "k1").await, 201);
    assert_eq!(tb.sim.tokens_by_kid().get(tb.key.kid()), Some(&1));
    assert!(
        !format!("{t1:?}").contains(&t1.header_value()[7..]),
        "Debug must not show the token"
    );
}

#[tokio::test]
async fn many_waiters_share_one_refresh() {
    let tb = testbed().await;
    let ts = Arc::new(source(&tb, Clock::system()));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let ts = ts.clone();
        tasks.push(tokio::spawn(async move { ts.bearer().await.unwrap() }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        tb.sim.stats().token_ok,
        1,
        "one token request for 20 concurrent callers"
    );
}

#[tokio::test]
async fn token_is_refreshed_ahead_of_expiry() {
    let sim = SimConfig {
        token_lifetime: Duration::from_secs(2),
        ..SimConfig::default()
    };
    let tb = Testbed::start(sim, None, AgentKnobs::default())
        .await
        .unwrap();
    let ts = source(&tb, Clock::system());
    let t1 = ts.bearer().await.unwrap();
    assert_eq!(ts.bearer().await.unwrap(), t1, "still fresh");
    // Refreshed at half its 2 s life, before CHeKT would call it expired.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let t2 = ts.bearer().await.unwrap();
    assert_ne!(t1, t2);
    assert_eq!(tb.sim.stats().token_ok, 2);
    assert_eq!(post_event(&tb, &t2.header_value(), "kfresh").await, 201);
}

#[tokio::test]
async fn refresh_on_401() {
    let tb = testbed().await;
    let ts = source(&tb, Clock::system());
    let t1 = ts.bearer().await.unwrap();
    tb.sim.expire_tokens();
    assert_eq!(post_event(&tb, &t1.header_value(), "k2").await, 401);
    ts.invalidate(&t1).await.unwrap();
    let t2 = ts.bearer().await.unwrap();
    assert_ne!(t1, t2);
    assert_eq!(post_event(&tb, &t2.header_value(), "k2").await, 201);
    assert_eq!(tb.sim.stats().token_ok, 2);
}

/// Sign an assertion by hand (not through the agent) so the simulator's checks can be
/// probed with claims the agent would never produce.
fn assertion(tb: &Testbed, iat: i64, exp: i64, jti: &str) -> String {
    let claims = serde_json::json!({
        "iss": CLIENT_ID, "sub": CLIENT_ID, "aud": tb.sim.tenant_audience(),
        "iat": iat, "exp": exp, "jti": jti,
    });
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(tb.key.kid().to_string());
    jsonwebtoken::encode(&h, &claims, &tb.key.encoding_key()).unwrap()
}

async fn token_request(tb: &Testbed, assertion: &str) -> (u16, serde_json::Value) {
    let (cfg, _) = tb.config().unwrap();
    let http = chekt_agent::upload::http_client(&cfg.chekt).unwrap();
    let r = http
        .post(tb.sim.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
            ("audience", chekt_agent::simulator::DEFAULT_API_AUDIENCE),
        ])
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or_default())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn simulator_rejects_replayed_jti() {
    let tb = testbed().await;
    let a = assertion(&tb, now(), now() + 60, "jti-replay-1");
    let (s1, _) = token_request(&tb, &a).await;
    assert_eq!(s1, 200);
    let (s2, body) = token_request(&tb, &a).await;
    assert_eq!(s2, 401, "{body}");
    assert_eq!(body["error"], "invalid_client");
    assert!(
        body["error_description"].as_str().unwrap().contains("jti"),
        "{body}"
    );
}

#[tokio::test]
async fn simulator_rejects_assertion_living_over_300s() {
    let tb = testbed().await;
    let (s, body) = token_request(&tb, &assertion(&tb, now(), now() + 301, "jti-long-1")).await;
    assert_eq!(s, 401, "{body}");
    assert!(
        body["error_description"].as_str().unwrap().contains("300"),
        "{body}"
    );
    let (s, _) = token_request(&tb, &assertion(&tb, now(), now() + 300, "jti-ok-1")).await;
    assert_eq!(s, 200, "exactly 300 s is allowed");
}

#[tokio::test]
async fn simulator_rejects_tampered_signature() {
    let tb = testbed().await;
    let a = assertion(&tb, now(), now() + 60, "jti-tamper");
    let mut parts: Vec<String> = a.split('.').map(str::to_string).collect();
    let mut claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&parts[1])
            .unwrap(),
    )
    .unwrap();
    claims["sub"] = "someone-else".into();
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    let (s, body) = token_request(&tb, &parts.join(".")).await;
    assert_eq!(s, 401, "{body}");
}

#[tokio::test]
async fn clock_at_1970_authenticates_through_date_offset() {
    let tb = testbed().await;
    let skew = -(Clock::system().local_ms() - 86_400_000); // local clock reads 1970-01-02
    let clock = Clock::skewed(skew);
    assert!(clock.trusted_now().is_err());
    let ts = source(&tb, clock);
    let t = ts
        .bearer()
        .await
        .expect("authenticates after learning the time from Date");
    assert!(ts.clock().has_learned());
    assert_eq!(post_event(&tb, &t.header_value(), "k1970").await, 201);
}

#[tokio::test]
async fn clock_a_day_off_is_corrected_after_one_rejection() {
    let tb = testbed().await;
    let ts = source(&tb, Clock::skewed(86_400_000));
    ts.bearer()
        .await
        .expect("a day-ahead clock is corrected from the rejection's Date header");
    assert_eq!(tb.sim.stats().token_rejected, 1);
    assert_eq!(tb.sim.stats().token_ok, 1);
}

#[tokio::test]
async fn wrong_key_names_the_kid() {
    let tb = testbed().await;
    let dir = tempfile::tempdir().unwrap();
    let other = DeviceKey::generate_es256().unwrap();
    other.write_new(&dir.path().join("device.key")).unwrap();
    let ts =
        source(&tb, Clock::system()).with_key_store(KeyStore::new(dir.path().to_path_buf(), None));
    let e = ts.bearer().await.unwrap_err();
    assert!(matches!(e, AuthError::Rejected { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(other.kid()), "error names the kid: {msg}");
    assert!(msg.contains("invalid_client"), "{msg}");
    assert!(e.needs_attention());
}

#[tokio::test]
async fn rotation_promotes_on_success() {
    let tb = testbed().await;
    let store = tb.key_store();
    let next = DeviceKey::generate_es256().unwrap();
    store.stage_next(&next, false).unwrap();
    let jwks: Vec<jsonwebtoken::jwk::Jwk> = [tb.key.public_jwk(), next.public_jwk()]
        .iter()
        .map(|j| serde_json::from_value((*j).clone()).unwrap())
        .collect();
    tb.sim.register_client(CLIENT_ID, jwks).unwrap();
    let ts = source(&tb, Clock::system());
    ts.bearer().await.unwrap();
    assert_eq!(tb.sim.tokens_by_kid().get(next.kid()), Some(&1));
    assert_eq!(
        store.current().unwrap().kid(),
        next.kid(),
        "next key promoted"
    );
    assert!(store.next().unwrap().is_none());
    assert!(ts.rotation_note().is_none());
}

#[tokio::test]
async fn rotation_keeps_current_key_when_next_is_not_registered() {
    let tb = testbed().await;
    let store = tb.key_store();
    let next = DeviceKey::generate_es256().unwrap();
    store.stage_next(&next, false).unwrap();
    let ts = source(&tb, Clock::system());
    let t = ts.bearer().await.expect("current key still works");
    assert_eq!(post_event(&tb, &t.header_value(), "krot").await, 201);
    assert_eq!(store.current().unwrap().kid(), tb.key.kid(), "not promoted");
    assert_eq!(
        store.next().unwrap().unwrap().kid(),
        next.kid(),
        "still staged"
    );
    let note = ts.rotation_note().expect("the agent says why");
    assert!(note.contains(next.kid()), "{note}");
    // Never more than two keys: a second rotation is refused while one is staged.
    let third = DeviceKey::generate_es256().unwrap();
    assert!(store.stage_next(&third, false).is_err());
}

#[tokio::test]
async fn key_file_mode_0644_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let tb = testbed().await;
    let key = tb.dir.join("state/keys/device.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = agent(&["check-config", "--config", tb.config_path.to_str().unwrap()]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("chmod 600") && err.contains("0644"), "{err}");
    let (code, _, err) = agent(&["run", "--config", tb.config_path.to_str().unwrap()]);
    assert_eq!(code, 78, "run refuses too, before starting: {err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out, err) = agent(&["check-config", "--config", tb.config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test]
async fn api_key_mode_is_labelled_and_works() {
    let sim_cfg = SimConfig {
        api_keys: vec!["chekt_test_abc123".into()],
        ..SimConfig::default()
    };
    let tb = Testbed::start(sim_cfg, None, AgentKnobs::default())
        .await
        .unwrap();
    let text = std::fs::read_to_string(&tb.config_path).unwrap().replace(
        "auth = \"assertion\"",
        "auth = \"api_key\"\napi_key = \"chekt_test_abc123\"",
    );
    std::fs::write(&tb.config_path, text).unwrap();
    let (cfg, _) = tb.config().unwrap();
    assert!(
        !format!("{cfg:?}").contains("abc123"),
        "Debug of the config hides the API key"
    );
    let http = chekt_agent::upload::http_client(&cfg.chekt).unwrap();
    let ts = TokenSource::new(&cfg.chekt.auth, http, Arc::new(Clock::system()));
    assert!(ts.is_api_key());
    let t = ts.bearer().await.unwrap();
    assert_eq!(post_event(&tb, &t.header_value(), "kapi").await, 201);
    assert!(matches!(
        ts.invalidate(&t).await,
        Err(AuthError::ApiKeyRefused)
    ));
    let _ = Duration::ZERO;
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

#[tokio::test]
async fn rsa_key_imported_and_accepted_as_rs256() {
    let tb = testbed().await;
    let dir = tempfile::tempdir().unwrap();
    let kd = dir.path().join("keys");
    let (code, out, err) = agent(&[
        "key",
        "generate",
        "--rsa",
        &format!("{FIXTURES}/rsa2048.pem"),
        "--key-dir",
        kd.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"RS256\""), "{out}");
    let store = KeyStore::new(kd, None);
    let key = store.current().unwrap();
    assert_eq!(key.alg(), jsonwebtoken::Algorithm::RS256);
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk().clone()).unwrap();
    tb.sim.register_client(CLIENT_ID, vec![jwk]).unwrap();
    let ts = source(&tb, Clock::system()).with_key_store(store);
    let t = ts.bearer().await.expect("RS256 assertion accepted");
    assert_eq!(post_event(&tb, &t.header_value(), "krsa").await, 201);
}

#[test]
fn small_or_pkcs1_rsa_keys_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let kd = dir.path().join("keys");
    let (code, _, err) = agent(&[
        "key",
        "generate",
        "--rsa",
        &format!("{FIXTURES}/rsa1024.pem"),
        "--key-dir",
        kd.to_str().unwrap(),
    ]);
    assert_eq!(code, 78);
    assert!(err.contains("2048"), "{err}");
    let (code, _, err) = agent(&[
        "key",
        "generate",
        "--rsa",
        &format!("{FIXTURES}/rsa2048-pkcs1.pem"),
        "--key-dir",
        kd.to_str().unwrap(),
    ]);
    assert_eq!(code, 78);
    assert!(err.contains("openssl pkcs8 -topk8"), "{err}");
}
