//! The device key: creation, import, storage on disk, public JWK, and the staged next key.
//!
//! Owns the key files under the key directory:
//! - `device.key` — the current key (PKCS#8 PEM, mode 0600);
//! - `device.next.key` — a staged next key, written by `key rotate`, promoted to
//!   `device.key` by [`KeyStore::promote_next`] once CHeKT accepted a token signed with it.
//!
//! When the key directory has no `device.key`, the current key is systemd's credential
//! (`$CREDENTIALS_DIRECTORY/device.key`, from `LoadCredential=`) under the service, and the
//! installed key file (`chekt.key_file`, default `device.key` beside the configuration:
//! where `provision` puts it and what the unit loads) outside it, so `check-config`,
//! `key show` and `key rotate` run by hand see the key the service signs with.
//!
//! A next key staged by root (`key rotate` by hand) is handed to the owner of the key
//! directory (the service user), so the service can read it and promote it.
//!
//! Invariants:
//! - Never more than two keys live: current and (optionally) next — CHeKT's Auth0 tenant
//!   holds at most two public keys per client.
//! - Private key material is never printed, logged, or shown by `Debug`; only the public
//!   JWK and its `kid` (RFC 7638 thumbprint) are.
//! - A key file readable or writable by group or others is refused, with the fix.
//! - Key files are written with `create_new` (never silently overwritten) and fsync'd.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey};
use ring::signature::{self as rs, KeyPair};

pub const CURRENT_FILE: &str = "device.key";
pub const NEXT_FILE: &str = "device.next.key";
/// Name of the systemd credential holding the device key.
pub const CREDENTIAL_NAME: &str = "device.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no device key at {path} (create one with `chekt-agent key generate` or `chekt-agent provision`)"
    )]
    Missing { path: String },
    #[error(
        "device key {path} has mode {mode:04o}: it must not be readable or writable by group or others; fix with `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    #[error("cannot read device key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write device key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("refusing to overwrite existing device key {path}")]
    Exists { path: String },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    #[error("RSA key {path} has {bits} bits; CHeKT needs at least 2048")]
    TooSmall { path: String, bits: usize },
    #[error("key generation failed")]
    Generate,
}

/// A device signing key. `Debug` shows only the algorithm and kid.
pub struct DeviceKey {
    alg: Algorithm,
    kid: String,
    pkcs8: Vec<u8>,
    jwk: serde_json::Value,
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("private", &"<redacted>")
            .finish()
    }
}

impl DeviceKey {
    /// A fresh ECDSA P-256 (ES256) key from ring's system RNG.
    pub fn generate_es256() -> Result<DeviceKey, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = rs::EcdsaKeyPair::generate_pkcs8(&rs::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Generate)?;
        DeviceKey::from_pkcs8_der(doc.as_ref().to_vec(), "<generated>")
    }

    /// Parse a PKCS#8 DER key: ECDSA P-256 (ES256) or RSA >= 2048 bits (RS256).
    pub fn from_pkcs8_der(der: Vec<u8>, origin: &str) -> Result<DeviceKey, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        if let Ok(kp) =
            rs::EcdsaKeyPair::from_pkcs8(&rs::ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
        {
            let p = kp.public_key().as_ref();
            let (x, y) = (
                URL_SAFE_NO_PAD.encode(&p[1..33]),
                URL_SAFE_NO_PAD.encode(&p[33..65]),
            );
            // RFC 7638: required members, lexicographic order, no whitespace.
            let canon = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
            let kid = thumbprint(&canon);
            let jwk = serde_json::json!({
                "kty": "EC", "crv": "P-256", "x": x, "y": y,
                "alg": "ES256", "use": "sig", "kid": kid,
            });
            return Ok(DeviceKey {
                alg: Algorithm::ES256,
                kid,
                pkcs8: der,
                jwk,
            });
        }
        match rs::RsaKeyPair::from_pkcs8(&der) {
            Ok(kp) => {
                let bits = kp.public().modulus_len() * 8;
                if bits < 2048 {
                    return Err(KeyError::TooSmall {
                        path: origin.into(),
                        bits,
                    });
                }
                let c: rs::RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
                let (n, e) = (URL_SAFE_NO_PAD.encode(&c.n), URL_SAFE_NO_PAD.encode(&c.e));
                let canon = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
                let kid = thumbprint(&canon);
                let jwk = serde_json::json!({
                    "kty": "RSA", "n": n, "e": e, "alg": "RS256", "use": "sig", "kid": kid,
                });
                Ok(DeviceKey {
                    alg: Algorithm::RS256,
                    kid,
                    pkcs8: der,
                    jwk,
                })
            }
            Err(e) => {
                // ring refuses RSA keys under 2048 bits as "InvalidComponent"; say so plainly.
                let why = e.to_string();
                let message = if why == "TooSmall" {
                    "RSA key is too small: CHeKT needs at least 2048 bits".to_string()
                } else {
                    format!("not an ECDSA P-256 or RSA PKCS#8 private key ({why})")
                };
                Err(KeyError::Format {
                    path: origin.into(),
                    message,
                })
            }
        }
    }

    /// Parse PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pem(pem: &str, origin: &str) -> Result<DeviceKey, KeyError> {
        if pem.contains("-----BEGIN RSA PRIVATE KEY-----")
            || pem.contains("-----BEGIN EC PRIVATE KEY-----")
        {
            return Err(KeyError::Format {
                path: origin.into(),
                message: "this is a PKCS#1/SEC1 key; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in OLD.pem -out NEW.pem`".into(),
            });
        }
        if pem.contains("ENCRYPTED PRIVATE KEY") {
            return Err(KeyError::Format {
                path: origin.into(),
                message: "encrypted keys are not supported: the agent starts unattended".into(),
            });
        }
        let body = pem
            .split("-----BEGIN PRIVATE KEY-----")
            .nth(1)
            .and_then(|rest| rest.split("-----END PRIVATE KEY-----").next())
            .ok_or_else(|| KeyError::Format {
                path: origin.into(),
                message: "no `-----BEGIN PRIVATE KEY-----` block (PKCS#8 PEM expected)".into(),
            })?;
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let der = STANDARD.decode(b64).map_err(|e| KeyError::Format {
            path: origin.into(),
            message: format!("bad base64 in PEM body: {e}"),
        })?;
        DeviceKey::from_pkcs8_der(der, origin)
    }

    pub fn to_pem(&self) -> String {
        let b64 = STANDARD.encode(&self.pkcs8);
        let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// RFC 7638 JWK thumbprint (SHA-256, base64url).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK to register with CHeKT (`kty`, key members, `alg`, `use`, `kid`).
    pub fn public_jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    pub fn encoding_key(&self) -> EncodingKey {
        match self.alg {
            Algorithm::ES256 => EncodingKey::from_ec_der(&self.pkcs8),
            _ => EncodingKey::from_rsa_der(&self.pkcs8),
        }
    }

    /// Load a key file, refusing one that group or others can access.
    pub fn load(path: &Path) -> Result<DeviceKey, KeyError> {
        let shown = path.display().to_string();
        let meta = fs::metadata(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                KeyError::Missing {
                    path: shown.clone(),
                }
            } else {
                KeyError::Read {
                    path: shown.clone(),
                    source,
                }
            }
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: shown, mode });
        }
        let pem = fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        DeviceKey::from_pem(&pem, &shown)
    }

    /// Write a new key file with mode 0600; refuses to overwrite. fsyncs file and directory.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let shown = path.display().to_string();
        let werr = |source| KeyError::Write {
            path: shown.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(werr)?;
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists {
                        path: shown.clone(),
                    }
                } else {
                    KeyError::Write {
                        path: shown.clone(),
                        source,
                    }
                }
            })?;
        // create_new's mode is filtered by the umask; make sure it is exactly 0600.
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(werr)?;
        f.write_all(self.to_pem().as_bytes()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        sync_dir(path).map_err(werr)?;
        Ok(())
    }
}

/// Give `paths` the owner and group of `like` where they differ. Only root may; anyone else
/// is told what is wrong (the service may not be able to read what was written).
fn give_to_owner_of<'a>(
    like: &Path,
    paths: impl Iterator<Item = &'a Path>,
) -> Result<(), KeyError> {
    use std::os::unix::fs::MetadataExt;
    let werr = |p: &Path, source| KeyError::Write {
        path: p.display().to_string(),
        source,
    };
    let want = fs::metadata(like).map_err(|e| werr(like, e))?;
    for p in paths {
        let have = fs::metadata(p).map_err(|e| werr(p, e))?;
        if (have.uid(), have.gid()) == (want.uid(), want.gid()) {
            continue;
        }
        std::os::unix::fs::chown(p, Some(want.uid()), Some(want.gid())).map_err(|e| {
            werr(
                p,
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give it to uid {} gid {} (the owner of {}), so the agent may not read it: {e}; run this as root or as that user",
                        want.uid(),
                        want.gid(),
                        like.display()
                    ),
                ),
            )
        })?;
    }
    Ok(())
}

fn thumbprint(canonical: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Where the current and next keys live.
#[derive(Clone, Debug)]
pub struct KeyStore {
    dir: PathBuf,
    credential: Option<PathBuf>,
    installed: Option<PathBuf>,
}

impl KeyStore {
    /// `credentials_dir` is `$CREDENTIALS_DIRECTORY` when systemd set it.
    pub fn new(dir: PathBuf, credentials_dir: Option<PathBuf>) -> KeyStore {
        KeyStore {
            dir,
            credential: credentials_dir.map(|d| d.join(CREDENTIAL_NAME)),
            installed: None,
        }
    }

    /// The installed key file, current when neither the key directory nor a systemd
    /// credential has one.
    pub fn with_installed(mut self, path: PathBuf) -> KeyStore {
        self.installed = Some(path);
        self
    }

    /// From the key directory and the process environment.
    pub fn from_env(dir: PathBuf) -> KeyStore {
        KeyStore::new(
            dir,
            std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key directory's own `device.key` if it exists, else the systemd credential when
    /// running under systemd, else the installed key file (else the key directory's path,
    /// which then names what is missing).
    pub fn current_path(&self) -> PathBuf {
        let own = self.dir.join(CURRENT_FILE);
        if own.exists() {
            return own;
        }
        match (&self.credential, &self.installed) {
            (Some(c), _) => c.clone(),
            (None, Some(i)) => i.clone(),
            (None, None) => own,
        }
    }

    pub fn next_path(&self) -> PathBuf {
        self.dir.join(NEXT_FILE)
    }

    pub fn current(&self) -> Result<DeviceKey, KeyError> {
        DeviceKey::load(&self.current_path())
    }

    /// The staged next key, if one is staged.
    pub fn next(&self) -> Result<Option<DeviceKey>, KeyError> {
        let p = self.next_path();
        if !p.exists() {
            return Ok(None);
        }
        DeviceKey::load(&p).map(Some)
    }

    /// Stage `key` as the next key. Refuses when one is already staged (two keys live at
    /// most), unless `replace`.
    /// Directories it creates and the file get the owner of the nearest existing ancestor
    /// of the key directory when that differs (root staging a key for the service user).
    pub fn stage_next(&self, key: &DeviceKey, replace: bool) -> Result<(), KeyError> {
        let p = self.next_path();
        if replace && p.exists() {
            fs::remove_file(&p).map_err(|source| KeyError::Write {
                path: p.display().to_string(),
                source,
            })?;
        }
        let anchor = self
            .dir
            .ancestors()
            .find(|a| a.exists())
            .map(Path::to_path_buf);
        key.write_new(&p)?;
        if let Some(anchor) = anchor {
            let created: Vec<&Path> = self
                .dir
                .ancestors()
                .take_while(|a| *a != anchor.as_path())
                .collect();
            give_to_owner_of(&anchor, created.into_iter().chain([p.as_path()]))?;
        }
        Ok(())
    }

    /// Make the staged next key current: atomic rename within the key directory, then
    /// fsync of the directory. The old key is gone afterwards (retire it at CHeKT).
    pub fn promote_next(&self) -> Result<(), KeyError> {
        let next = self.next_path();
        let cur = self.dir.join(CURRENT_FILE);
        fs::rename(&next, &cur).map_err(|source| KeyError::Write {
            path: cur.display().to_string(),
            source,
        })?;
        sync_dir(&cur).map_err(|source| KeyError::Write {
            path: cur.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn es256_round_trip_and_kid_is_thumbprint() {
        let k = DeviceKey::generate_es256().unwrap();
        let again = DeviceKey::from_pem(&k.to_pem(), "t").unwrap();
        assert_eq!(k.kid(), again.kid());
        assert_eq!(k.kid().len(), 43);
        assert!(!format!("{k:?}").contains(&k.to_pem()[30..60]));
    }

    #[test]
    fn rejects_group_readable_file_with_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("device.key");
        let k = DeviceKey::generate_es256().unwrap();
        k.write_new(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = DeviceKey::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(e.contains("0644"), "{e}");
        assert!(matches!(k.write_new(&p), Err(KeyError::Exists { .. })));
    }

    #[test]
    fn credential_is_current_until_the_key_dir_has_its_own() {
        let state = tempfile::tempdir().unwrap();
        let creds = tempfile::tempdir().unwrap();
        let cred_key = DeviceKey::generate_es256().unwrap();
        cred_key
            .write_new(&creds.path().join(CREDENTIAL_NAME))
            .unwrap();
        let store = KeyStore::new(state.path().join("keys"), Some(creds.path().to_path_buf()));
        assert_eq!(store.current().unwrap().kid(), cred_key.kid());
        // After a rotation is promoted, the key directory's own key wins.
        let next = DeviceKey::generate_es256().unwrap();
        store.stage_next(&next, false).unwrap();
        store.promote_next().unwrap();
        assert_eq!(store.current().unwrap().kid(), next.kid());
    }

    #[test]
    fn installed_key_is_current_outside_systemd_only() {
        let state = tempfile::tempdir().unwrap();
        let etc = tempfile::tempdir().unwrap();
        let creds = tempfile::tempdir().unwrap();
        let installed = etc.path().join("device.key");
        let key = DeviceKey::generate_es256().unwrap();
        key.write_new(&installed).unwrap();
        let keys = state.path().join("keys");
        let outside = KeyStore::new(keys.clone(), None).with_installed(installed.clone());
        assert_eq!(outside.current_path(), installed);
        assert_eq!(outside.current().unwrap().kid(), key.kid());
        // Under systemd the credential is the key, even when the installed file exists.
        let cred_key = DeviceKey::generate_es256().unwrap();
        cred_key
            .write_new(&creds.path().join(CREDENTIAL_NAME))
            .unwrap();
        let under = KeyStore::new(keys.clone(), Some(creds.path().to_path_buf()))
            .with_installed(installed.clone());
        assert_eq!(under.current().unwrap().kid(), cred_key.kid());
        // A rotation staged from outside (no key directory yet) is promoted by the
        // service; from then on both see the key directory's key.
        let next = DeviceKey::generate_es256().unwrap();
        outside.stage_next(&next, false).unwrap();
        assert!(keys.is_dir());
        under.promote_next().unwrap();
        assert_eq!(outside.current().unwrap().kid(), next.kid());
        assert_eq!(under.current().unwrap().kid(), next.kid());
    }

    #[test]
    fn pkcs1_is_refused_with_conversion_hint() {
        let e = DeviceKey::from_pem(
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            "k.pem",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("openssl pkcs8 -topk8"), "{e}");
    }
}
