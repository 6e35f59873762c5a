//! Tests of the simulator through real HTTPS from a reqwest client: token endpoint checks,
//! event acceptance, idempotency, validation, auth, rate limiting, faults and outages.
//!
//! Invariant: assertions here are signed with `jsonwebtoken::encode` and a ring-generated
//! P-256 key; the simulator only ever sees the public JWK built from that key.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use super::token::JWT_BEARER;
use super::*;

const CLIENT: &str = "client-1";

struct TestKey {
    pkcs8: Vec<u8>,
    kid: String,
}

impl TestKey {
    fn new(kid: &str) -> TestKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate P-256 key");
        TestKey {
            pkcs8: pkcs8.as_ref().to_vec(),
            kid: kid.to_string(),
        }
    }

    fn jwk(&self) -> Jwk {
        let rng = ring::rand::SystemRandom::new();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.pkcs8, &rng)
            .expect("parse own key");
        let p = kp.public_key().as_ref();
        assert_eq!((p.len(), p[0]), (65, 4));
        Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(KeyAlgorithm::ES256),
                key_id: Some(self.kid.clone()),
                ..Default::default()
            },
            algorithm: AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                key_type: EllipticCurveKeyType::EC,
                curve: EllipticCurve::P256,
                x: URL_SAFE_NO_PAD.encode(&p[1..33]),
                y: URL_SAFE_NO_PAD.encode(&p[33..]),
            }),
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&self.pkcs8))
            .expect("sign assertion")
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn jti() -> String {
    let rng = ring::rand::SystemRandom::new();
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&rng, &mut b).unwrap();
    URL_SAFE_NO_PAD.encode(b)
}

fn claims(sim: &Simulator, iat: i64, exp: i64, jti: &str) -> Value {
    json!({
        "iss": CLIENT, "sub": CLIENT, "aud": sim.tenant_audience(),
        "iat": iat, "exp": exp, "jti": jti,
    })
}

/// The reqwest 0.13 client the crate's tests use: with `rustls-no-provider`, install the
/// ring provider as process default, then trust only the simulator's CA.
fn client_for(sim: &Simulator) -> reqwest::Client {
    crate::jwt::install();
    let ca = reqwest::Certificate::from_pem(sim.ca_pem().as_bytes()).expect("CA PEM");
    reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

struct Fixture {
    sim: Simulator,
    http: reqwest::Client,
    key: TestKey,
}

async fn fixture(cfg: SimConfig) -> Fixture {
    let sim = Simulator::start(cfg).await.expect("start simulator");
    let key = TestKey::new("key-1");
    sim.register_client(CLIENT, vec![key.jwk()]).unwrap();
    let http = client_for(&sim);
    Fixture { sim, http, key }
}

impl Fixture {
    async fn token_response(&self, assertion: &str) -> reqwest::Response {
        self.http
            .post(self.sim.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion),
                ("audience", DEFAULT_API_AUDIENCE),
                (
                    DEFAULT_PARTNER_CLAIM,
                    r#"{"dealer_id":"d-1","site_id":"s-1"}"#,
                ),
            ])
            .send()
            .await
            .expect("token request")
    }

    /// Status and `error_description` of a token request.
    async fn token_error(&self, assertion: &str) -> (u16, String, String) {
        let r = self.token_response(assertion).await;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        (
            status,
            body["error"].as_str().unwrap_or_default().to_string(),
            body["error_description"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }

    async fn token(&self) -> String {
        let now = unix_now();
        let a = self.key.sign(&claims(&self.sim, now, now + 60, &jti()));
        let r = self.token_response(&a).await;
        assert_eq!(r.status(), 200);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        body["access_token"].as_str().unwrap().to_string()
    }

    async fn post_raw(
        &self,
        token: Option<&str>,
        key: Option<&str>,
        body: String,
    ) -> reqwest::Response {
        let mut rb = self
            .http
            .post(self.sim.events_url())
            .header("content-type", "application/json")
            .header("x-partner-trace-id", "3f1c9a6e-0000-4000-8000-000000000001")
            .body(body);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(k) = key {
            rb = rb.header("Idempotency-Key", k);
        }
        rb.send().await.expect("event request")
    }

    async fn post(&self, token: &str, key: &str, body: &Value) -> reqwest::Response {
        self.post_raw(Some(token), Some(key), body.to_string())
            .await
    }
}

fn event(id: &str) -> Value {
    json!({
        "version": "1.0", "location_id": "Z6RSOG", "recorder_id": "Z6RANV",
        "camera_id": "2fe519b4-2438-4aa1-b051-87cf22bb", "event_id": id,
        "event_type": "alarm", "event_status": "active",
    })
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn error_of(r: reqwest::Response) -> Value {
    let body: Value = r.json().await.unwrap();
    body["error"].clone()
}

fn no_limit() -> SimConfig {
    SimConfig {
        rate_limit: None,
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn token_ok_and_counted_by_kid() {
    let f = fixture(no_limit()).await;
    let t = f.token().await;
    assert!(URL_SAFE_NO_PAD.decode(&t).unwrap().len() == 32);
    assert_eq!(f.sim.stats().token_ok, 1);
    assert_eq!(f.sim.tokens_by_kid().get("key-1"), Some(&1));
    f.sim.shutdown().await;
}

#[tokio::test]
async fn replayed_jti_rejected() {
    let f = fixture(no_limit()).await;
    let now = unix_now();
    let a = f.key.sign(&claims(&f.sim, now, now + 60, "jti-once"));
    assert_eq!(f.token_response(&a).await.status(), 200);
    let (status, error, desc) = f.token_error(&a).await;
    assert_eq!((status, error.as_str()), (401, "invalid_client"));
    assert!(desc.contains("jti already used"), "{desc}");
    // A fresh assertion with a new jti but the same id string reused is also refused.
    let b = f.key.sign(&claims(&f.sim, now, now + 90, "jti-once"));
    assert!(f.token_error(&b).await.2.contains("jti already used"));
    assert_eq!(f.sim.stats().token_rejected, 2);
}

#[tokio::test]
async fn lifetime_over_300_s_rejected() {
    let f = fixture(no_limit()).await;
    let now = unix_now();
    let a = f.key.sign(&claims(&f.sim, now, now + 301, &jti()));
    let (status, _, desc) = f.token_error(&a).await;
    assert_eq!(status, 401);
    assert!(
        desc.contains("assertion lifetime 301 s exceeds 300 s"),
        "{desc}"
    );
    // Exactly 300 s is fine.
    let a = f.key.sign(&claims(&f.sim, now, now + 300, &jti()));
    assert_eq!(f.token_response(&a).await.status(), 200);
}

#[tokio::test]
async fn unknown_kid_named_in_error() {
    let f = fixture(no_limit()).await;
    let other = TestKey::new("abc");
    let now = unix_now();
    let a = other.sign(&claims(&f.sim, now, now + 60, &jti()));
    let (status, error, desc) = f.token_error(&a).await;
    assert_eq!((status, error.as_str()), (401, "invalid_client"));
    assert!(
        desc.contains("unknown kid \"abc\" for client \"client-1\""),
        "{desc}"
    );
}

#[tokio::test]
async fn wrong_key_same_kid_fails_signature() {
    let f = fixture(no_limit()).await;
    let impostor = TestKey::new("key-1");
    let now = unix_now();
    let a = impostor.sign(&claims(&f.sim, now, now + 60, &jti()));
    let (status, _, desc) = f.token_error(&a).await;
    assert_eq!(status, 401);
    assert!(desc.contains("signature does not verify"), "{desc}");
}

#[tokio::test]
async fn iat_60_s_off_rejected_and_clock_offset_fixes_it() {
    let f = fixture(no_limit()).await;
    let now = unix_now();
    let a = f.key.sign(&claims(&f.sim, now + 60, now + 120, &jti()));
    let (status, _, desc) = f.token_error(&a).await;
    assert_eq!(status, 401);
    assert!(desc.contains(&format!("iat {}", now + 60)), "{desc}");
    assert!(desc.contains("s from server time"), "{desc}");
    // The same assertion is fine for a server whose clock is 60 s ahead.
    f.sim.set_clock_offset(60);
    assert_eq!(f.token_response(&a).await.status(), 200);
}

#[tokio::test]
async fn wrong_aud_hs256_and_audience_param_rejected() {
    let f = fixture(no_limit()).await;
    let now = unix_now();
    let mut c = claims(&f.sim, now, now + 60, &jti());
    c["aud"] = json!(f.sim.base_url()); // no trailing slash
    let (status, _, desc) = f.token_error(&f.key.sign(&c)).await;
    assert_eq!(status, 401);
    assert!(
        desc.contains(&format!("aud must be {}", f.sim.tenant_audience())),
        "{desc}"
    );

    // The ring provider cannot sign HS256; build the token by hand.
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT","kid":"key-1"}"#);
    let p = URL_SAFE_NO_PAD.encode(claims(&f.sim, now, now + 60, &jti()).to_string());
    let hs = format!("{h}.{p}.c2ln");
    let (status, _, desc) = f.token_error(&hs).await;
    assert_eq!(status, 401);
    assert!(desc.contains("alg HS256 not allowed"), "{desc}");

    let a = f.key.sign(&claims(&f.sim, now, now + 60, &jti()));
    let r = f
        .http
        .post(f.sim.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", a.as_str()),
            ("audience", "https://elsewhere/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "access_denied");
}

#[tokio::test]
async fn event_accepted_with_rate_limit_headers_and_date() {
    let f = fixture(SimConfig::default()).await;
    let t = f.token().await;
    let r = f.post(&t, "evt-1", &event("1")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("600"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("29"));
    let reset: i64 = header(&r, "x-ratelimit-reset").unwrap().parse().unwrap();
    assert!(reset >= unix_now() && reset <= unix_now() + 2, "{reset}");
    assert_eq!(r.headers().get_all("date").iter().count(), 1);
    assert!(header(&r, "x-request-id").unwrap().starts_with("req_"));
    let body: Value = r.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("evt_"));
    assert_eq!(
        body["upload_urls"]["snapshot"],
        format!("{}/upload/{id}/snapshot.jpg", f.sim.base_url())
    );
    let got = f.sim.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].idempotency_key, "evt-1");
    assert_eq!(got[0].client, CLIENT);
    assert_eq!(got[0].deliveries, 1);
    assert_eq!(got[0].body, event("1"));
    assert_eq!(
        got[0].trace_id.as_deref(),
        Some("3f1c9a6e-0000-4000-8000-000000000001")
    );
    // The upload URL takes the media.
    let up = f
        .http
        .put(body["upload_urls"]["clip"].as_str().unwrap())
        .header("content-type", "video/mp4")
        .body(vec![0u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 200);
    assert_eq!(f.sim.uploads()[0].bytes, 1000);
}

#[tokio::test]
async fn same_key_same_body_replays() {
    let f = fixture(no_limit()).await;
    let t = f.token().await;
    let first = f.post(&t, "k-1", &event("1")).await;
    assert_eq!(first.status(), 201);
    assert!(header(&first, "idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    // Same JSON, other formatting and key order.
    let pretty = r#"{ "event_status": "active", "event_type": "alarm", "event_id": "1",
        "camera_id": "2fe519b4-2438-4aa1-b051-87cf22bb", "recorder_id": "Z6RANV",
        "location_id": "Z6RSOG", "version": "1.0" }"#;
    let again = f.post_raw(Some(&t), Some("k-1"), pretty.to_string()).await;
    assert_eq!(again.status(), 201);
    assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first);
    assert_eq!(f.sim.received().len(), 1);
    assert_eq!(f.sim.received()[0].deliveries, 2);
    let s = f.sim.stats();
    assert_eq!((s.events_accepted, s.events_replayed), (1, 1));
}

#[tokio::test]
async fn same_key_different_body_conflicts() {
    let f = fixture(no_limit()).await;
    let t = f.token().await;
    assert_eq!(f.post(&t, "k-1", &event("1")).await.status(), 201);
    let r = f.post(&t, "k-1", &event("2")).await;
    assert_eq!(r.status(), 409);
    assert_eq!(error_of(r).await["code"], "idempotency_conflict");
    assert_eq!(f.sim.stats().conflicts_409, 1);
}

#[tokio::test]
async fn validation_and_idempotency_key_errors() {
    let f = fixture(no_limit()).await;
    let t = f.token().await;
    let mut body = event("1");
    body.as_object_mut().unwrap().remove("location_id");
    let r = f.post(&t, "k-1", &body).await;
    assert_eq!(r.status(), 422);
    let err = error_of(r).await;
    assert_eq!(err["code"], "validation_error");
    assert_eq!(err["field"], "location_id");
    assert!(err["request_id"].as_str().unwrap().starts_with("req_"));

    let mut body = event("1");
    body["event_type"] = json!("burglary");
    let err = error_of(f.post(&t, "k-2", &body).await).await;
    assert_eq!(err["field"], "event_type");

    // Not stored: fixing the body under the same key is accepted.
    assert_eq!(f.post(&t, "k-1", &event("1")).await.status(), 201);

    let r = f.post_raw(Some(&t), None, event("1").to_string()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_of(r).await["code"], "idempotency_key_required");
    let long = "x".repeat(256);
    let r = f
        .post_raw(Some(&t), Some(&long), event("1").to_string())
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(f.sim.stats().validation_422, 2);
}

#[tokio::test]
async fn unknown_location_is_404() {
    let f = fixture(SimConfig {
        known_locations: Some(vec!["OTHER".to_string()]),
        ..no_limit()
    })
    .await;
    let t = f.token().await;
    let r = f.post(&t, "k-1", &event("1")).await;
    assert_eq!(r.status(), 404);
    let err = error_of(r).await;
    assert_eq!(err["code"], "location_not_found");
    assert_eq!(err["field"], "location_id");
}

#[tokio::test]
async fn auth_failures_are_401() {
    let f = fixture(SimConfig {
        api_keys: vec!["chekt_test_abc".to_string()],
        ..no_limit()
    })
    .await;
    let r = f.post_raw(None, Some("k-1"), event("1").to_string()).await;
    assert_eq!(r.status(), 401);
    assert!(header(&r, "x-ratelimit-limit").is_none());
    assert_eq!(error_of(r).await["code"], "invalid_token");
    let r = f.post("bogus", "k-1", &event("1")).await;
    assert_eq!(r.status(), 401);
    // API keys work as bearer, with the key as the app.
    let r = f.post("chekt_test_abc", "k-1", &event("1")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(f.sim.received()[0].client, "chekt_test_abc");
    let r = f.post("chekt_test_nope", "k-1", &event("1")).await;
    assert_eq!(error_of(r).await["code"], "invalid_api_key");
    // Expired tokens: refresh-on-401.
    let t = f.token().await;
    assert_eq!(f.post(&t, "k-2", &event("2")).await.status(), 201);
    f.sim.expire_tokens();
    assert_eq!(f.post(&t, "k-3", &event("3")).await.status(), 401);
    let t2 = f.token().await;
    assert_eq!(f.post(&t2, "k-3", &event("3")).await.status(), 201);
    assert_eq!(f.sim.stats().unauthorized_401, 4);
}

#[tokio::test]
async fn burst_exhausted_gives_429_with_retry_after() {
    let f = fixture(SimConfig {
        rate_limit: Some(RateLimit {
            per_minute: 60,
            burst: 2,
        }),
        ..SimConfig::default()
    })
    .await;
    let t = f.token().await;
    let r = f.post(&t, "k-1", &event("1")).await;
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("1"));
    assert_eq!(f.post(&t, "k-2", &event("2")).await.status(), 201);
    let r = f.post(&t, "k-3", &event("3")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), Some("1"));
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("60"));
    assert_eq!(error_of(r).await["code"], "rate_limit_exceeded");
    assert_eq!(f.sim.stats().rate_limited_429, 1);
    assert_eq!(f.sim.received().len(), 2);
}

#[tokio::test]
async fn outage_refuses_then_same_port_serves_again() {
    outage_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_on_multi_thread_runtime() {
    for _ in 0..5 {
        outage_round_trip().await;
    }
}

async fn outage_round_trip() {
    let f = fixture(no_limit()).await;
    let t = f.token().await;
    assert_eq!(f.post(&t, "k-1", &event("1")).await.status(), 201);
    let addr = f.sim.local_addr();
    f.sim.set_outage(true);
    let raw = tokio::net::TcpStream::connect(addr).await;
    assert_eq!(
        raw.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let post_k2 = |http: &reqwest::Client| {
        http.post(f.sim.events_url())
            .bearer_auth(&t)
            .header("Idempotency-Key", "k-2")
            .json(&event("2"))
            .send()
    };
    let err = post_k2(&f.http).await.unwrap_err();
    // Refused on a new connection; reset (never answered) on a pooled keep-alive one, which
    // a multi-thread runtime may hand out before the client notices it was dropped.
    assert!(err.is_connect() || err.is_request(), "{err:?}");
    assert!(!err.is_status() && !err.is_timeout(), "{err:?}");
    f.sim.set_outage(false);
    assert_eq!(f.sim.local_addr(), addr);
    // The same port serves new connections again. A fresh client, because the old one may
    // still hold the k-1 keep-alive connection the outage killed: hyper returns it to the
    // pool asynchronously, so on a multi-thread runtime it can be handed out after the
    // outage and be reset. (The agent retries such a reset like any connection error.)
    let r = post_k2(&client_for(&f.sim))
        .await
        .expect("a new connection after the outage");
    assert_eq!(r.status(), 201);
    assert_eq!(f.sim.received().len(), 2);
    f.sim.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn error_rate_one_gives_500_before_processing() {
    let f = fixture(no_limit()).await;
    let t = f.token().await;
    f.sim.set_faults(Faults {
        error_rates: vec![(500, 1.0)],
        ..Faults::default()
    });
    let r = f.post(&t, "k-1", &event("1")).await;
    assert_eq!(r.status(), 500);
    assert_eq!(error_of(r).await["code"], "internal_error");
    assert!(f.sim.received().is_empty());
    f.sim.set_faults(Faults {
        error_rates: vec![(503, 1.0)],
        ..Faults::default()
    });
    let r = f.post(&t, "k-1", &event("1")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_of(r).await["code"], "service_unavailable");
    f.sim.set_faults(Faults::default());
    assert_eq!(f.post(&t, "k-1", &event("1")).await.status(), 201);
    assert_eq!(f.sim.stats().injected_faults, 2);
}

#[tokio::test]
async fn lost_response_stores_then_retry_replays() {
    let f = fixture(no_limit()).await;
    let t = f.token().await;
    f.sim.set_faults(Faults {
        lost_response_rate: 1.0,
        ..Faults::default()
    });
    assert_eq!(f.post(&t, "k-1", &event("1")).await.status(), 500);
    assert_eq!(f.sim.received()[0].deliveries, 0);
    f.sim.set_faults(Faults::default());
    let r = f.post(&t, "k-1", &event("1")).await;
    assert_eq!(r.status(), 201);
    assert_eq!(header(&r, "idempotent-replayed"), Some("true"));
    let got = f.sim.received();
    assert_eq!((got.len(), got[0].deliveries), (1, 1));
}

#[tokio::test]
async fn reset_stall_storm_and_token_faults() {
    let f = fixture(no_limit()).await;
    let t = f.token().await;
    f.sim.set_faults(Faults {
        reset_rate: 1.0,
        ..Faults::default()
    });
    let err = f.post_raw_result(&t, "k-1").await.unwrap_err();
    assert!(!err.is_status(), "{err:?}");
    let mut src: Option<&dyn std::error::Error> = Some(&err);
    let mut reset = false;
    while let Some(e) = src {
        reset |= e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset);
        src = e.source();
    }
    assert!(reset, "expected a TCP reset: {err:?}");
    assert_eq!(f.sim.stats().resets, 1);

    f.sim.set_faults(Faults {
        stall_rate: 1.0,
        stall: Duration::from_secs(3),
        ..Faults::default()
    });
    let err = f
        .http
        .post(f.sim.events_url())
        .bearer_auth(&t)
        .header("Idempotency-Key", "k-1")
        .json(&event("1"))
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    f.sim.set_faults(Faults {
        rate_limit_storm: Some(7),
        ..Faults::default()
    });
    let r = f.post(&t, "k-1", &event("1")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "retry-after"), Some("7"));

    f.sim.set_faults(Faults {
        token_error_rate: 1.0,
        ..Faults::default()
    });
    let now = unix_now();
    let a = f.key.sign(&claims(&f.sim, now, now + 60, &jti()));
    assert_eq!(f.token_response(&a).await.status(), 503);
    f.sim.set_faults(Faults::default());
    assert_eq!(f.token_response(&a).await.status(), 200);
    assert!(f.sim.received().is_empty());
}

impl Fixture {
    async fn post_raw_result(&self, token: &str, key: &str) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.sim.events_url())
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&event("1"))
            .send()
            .await
    }
}

#[tokio::test]
async fn date_header_follows_clock_offset_and_unknown_paths_404() {
    let f = fixture(no_limit()).await;
    f.sim.set_clock_offset(-86_400);
    let r = f.http.head(f.sim.base_url() + "/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers().get_all("date").iter().count(), 1);
    let date = httpdate::parse_http_date(header(&r, "date").unwrap()).unwrap();
    let behind = SystemTime::now().duration_since(date).unwrap().as_secs();
    assert!((86_398..=86_402).contains(&behind), "{behind}");
    let r = f.http.get(f.sim.base_url() + "/nope").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_of(r).await["code"], "not_found");
}

#[tokio::test]
async fn registration_limits_and_preconfigured_client() {
    let sim = Simulator::start(no_limit()).await.unwrap();
    let keys: Vec<Jwk> = ["a", "b", "c"]
        .iter()
        .map(|k| TestKey::new(k).jwk())
        .collect();
    assert!(matches!(
        sim.register_client(CLIENT, keys.clone()),
        Err(SimError::TooManyKeys { count: 3, .. })
    ));
    let mut no_kid = keys[0].clone();
    no_kid.common.key_id = None;
    assert!(matches!(
        sim.register_client(CLIENT, vec![no_kid]),
        Err(SimError::MissingKid { .. })
    ));
    sim.register_client(CLIENT, keys[..2].to_vec()).unwrap();
    // A client without a process-default provider: the preconfigured rustls config.
    let http = sim.http_client();
    let r = http.get(sim.base_url() + "/").send().await.unwrap();
    assert_eq!(r.status(), 200);
    sim.shutdown().await;
}

#[test]
fn form_and_canonical_json() {
    let f = token::parse_form(b"a=1+2&b=%7B%22x%22%3A1%7D&c=").unwrap();
    assert_eq!(f["a"], "1 2");
    assert_eq!(f["b"], r#"{"x":1}"#);
    assert_eq!(f["c"], "");
    assert!(token::parse_form(b"a=1&a=2").is_err());
    assert!(token::parse_form(b"a=%zz").is_err());
    let a: Value = serde_json::from_str(r#"{"b": [1, {"d":2,"c":3}], "a": "x"}"#).unwrap();
    assert_eq!(
        events::canonical_json(&a),
        r#"{"a":"x","b":[1,{"c":3,"d":2}]}"#
    );
}

/// A `Write` the test can read while `run_with_output` writes to it.
#[derive(Clone, Default)]
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    async fn wait_for(&self, needle: &str) -> String {
        for _ in 0..250 {
            let t = self.text();
            if t.contains(needle) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{needle:?} never printed; output so far: {}", self.text());
    }
}

#[derive(clap::Parser)]
struct StandaloneCli {
    #[command(flatten)]
    sim: SimArgs,
}

#[tokio::test]
async fn standalone_writes_ca_and_prints_events() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let key = TestKey::new("sa-1");
    let jwk_path = dir.path().join("client.json");
    std::fs::write(&jwk_path, serde_json::to_string(&vec![key.jwk()]).unwrap()).unwrap();
    let cli = StandaloneCli::try_parse_from([
        "sim".to_string(),
        "--bind=127.0.0.1:0".to_string(),
        format!("--out-dir={}", dir.path().display()),
        format!("--register={CLIENT}={}", jwk_path.display()),
        "--api-key=chekt_test_k".to_string(),
        "--rate-limit-per-minute=0".to_string(),
    ])
    .unwrap();
    assert!(cli.sim.config().rate_limit.is_none());
    let out = SharedBuf::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut w = out.clone();
    let task = tokio::spawn(async move {
        run_with_output(
            cli.sim,
            async {
                let _ = stopped.await;
            },
            &mut w,
        )
        .await
    });
    let banner = out.wait_for("ca_pem=").await;
    let line = |k: &str| {
        banner
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    crate::jwt::install();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .build()
        .unwrap();
    let now = unix_now();
    let assertion = key.sign(&json!({
        "iss": CLIENT, "sub": CLIENT, "aud": line("tenant_audience"),
        "iat": now, "exp": now + 60, "jti": jti(),
    }));
    let r = http
        .post(line("token_url"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.as_str()),
            ("audience", DEFAULT_API_AUDIENCE),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let token: Value = r.json().await.unwrap();
    for (bearer, key) in [
        (token["access_token"].as_str().unwrap(), "sa-k1"),
        ("chekt_test_k", "sa-k2"),
    ] {
        let r = http
            .post(line("events_url"))
            .bearer_auth(bearer)
            .header("Idempotency-Key", key)
            .json(&event(key))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert!(header(&r, "x-ratelimit-limit").is_none());
    }
    let printed = out.wait_for("\"idempotency_key\":\"sa-k2\"").await;
    let events: Vec<Value> = printed
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["client"], CLIENT);
    assert_eq!(events[1]["client"], "chekt_test_k");
    assert_eq!(events[0]["body"]["event_id"], "sa-k1");
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
