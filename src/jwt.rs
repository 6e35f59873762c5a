//! A ring-backed crypto provider for `jsonwebtoken`, so the whole binary has one crypto
//! stack (ring) — no aws-lc, no OpenSSL, no second RustCrypto stack.
//!
//! Owns: the mapping from JWT algorithms to ring primitives, for signing (the agent's
//! assertions) and for verification (the simulator's token endpoint, a separate code path
//! from the signer: it sees only the registered public key).
//!
//! Invariants: only ES256, RS256, RS384 and PS256 are supported (the agent's allow-list;
//! CHeKT's Auth0 tenant accepts RS256/PS256/RS384). Any other algorithm is refused with
//! `InvalidAlgorithm`; HMAC is never accepted. Encoding keys are PKCS#8 DER.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::signature as rs;

/// Algorithms the agent signs with and the simulator accepts.
pub const ALLOWED: [Algorithm; 4] = [
    Algorithm::ES256,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::PS256,
];

/// Install the ring provider as jsonwebtoken's process default. Idempotent.
// ring's rustls provider is marked deprecated for lacking post-quantum key exchange;
// it is still the one crypto stack this agent ships.
#[allow(deprecated)]
pub fn install() {
    let _ = PROVIDER.install_default();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_private_key,
        rsa_pub_components_from_public_key: |_| Err(ErrorKind::InvalidKeyFormat.into()),
        ec_pub_components_from_private_key: ec_components_from_private_key,
        ed_pub_components_from_private_key: |_, _| Err(ErrorKind::InvalidAlgorithm.into()),
        compute_digest,
    },
};

fn compute_digest(data: &[u8], h: ThumbprintHash) -> Result<Vec<u8>, Error> {
    let alg = match h {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(ring::digest::digest(alg, data).as_ref().to_vec())
}

fn rsa_components_from_private_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let kp = rs::RsaKeyPair::from_pkcs8(der)
        .map_err(|e| Error::from(ErrorKind::InvalidRsaKey(e.to_string())))?;
    let c: rs::RsaPublicKeyComponents<Vec<u8>> = kp.public().into();
    Ok((c.n, c.e))
}

fn ec_components_from_private_key(
    der: &[u8],
    alg: Algorithm,
) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), Error> {
    if alg != Algorithm::ES256 {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let rng = ring::rand::SystemRandom::new();
    let kp = rs::EcdsaKeyPair::from_pkcs8(&rs::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        .map_err(|_| Error::from(ErrorKind::InvalidEcdsaKey))?;
    use ring::signature::KeyPair;
    let p = kp.public_key().as_ref();
    if p.len() != 65 || p[0] != 4 {
        return Err(ErrorKind::InvalidEcdsaKey.into());
    }
    Ok((EllipticCurve::P256, p[1..33].to_vec(), p[33..].to_vec()))
}

enum SignerKey {
    Ec(rs::EcdsaKeyPair),
    Rsa(rs::RsaKeyPair, &'static dyn rs::RsaEncoding),
}

struct RingSigner {
    alg: Algorithm,
    key: SignerKey,
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let rng = ring::rand::SystemRandom::new();
        match &self.key {
            SignerKey::Ec(kp) => kp
                .sign(&rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new()),
            SignerKey::Rsa(kp, enc) => {
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(*enc, &rng, msg, &mut sig)
                    .map_err(|_| signature::Error::new())?;
                Ok(sig)
            }
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    let der = key.as_bytes();
    let rsa = |enc: &'static dyn rs::RsaEncoding| -> Result<SignerKey, Error> {
        let kp = rs::RsaKeyPair::from_pkcs8(der)
            .map_err(|e| Error::from(ErrorKind::InvalidRsaKey(e.to_string())))?;
        Ok(SignerKey::Rsa(kp, enc))
    };
    let key = match alg {
        Algorithm::ES256 => {
            let rng = ring::rand::SystemRandom::new();
            SignerKey::Ec(
                rs::EcdsaKeyPair::from_pkcs8(&rs::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
                    .map_err(|_| Error::from(ErrorKind::InvalidEcdsaKey))?,
            )
        }
        Algorithm::RS256 => rsa(&rs::RSA_PKCS1_SHA256)?,
        Algorithm::RS384 => rsa(&rs::RSA_PKCS1_SHA384)?,
        Algorithm::PS256 => rsa(&rs::RSA_PSS_SHA256)?,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(Box::new(RingSigner { alg: *alg, key }))
}

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let fail = |_| signature::Error::new();
        match self.alg {
            Algorithm::ES256 => {
                let bytes = self
                    .key
                    .try_get_as_bytes()
                    .map_err(signature::Error::from_source)?;
                rs::UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, bytes)
                    .verify(msg, sig)
                    .map_err(fail)
            }
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::PS256 => {
                let params: &'static rs::RsaParameters = match self.alg {
                    Algorithm::RS256 => &rs::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::RS384 => &rs::RSA_PKCS1_2048_8192_SHA384,
                    _ => &rs::RSA_PSS_2048_8192_SHA256,
                };
                match self.key.kind() {
                    DecodingKeyKind::RsaModulusExponent { n, e } => {
                        rs::RsaPublicKeyComponents { n, e }
                            .verify(params, msg, sig)
                            .map_err(fail)
                    }
                    DecodingKeyKind::SecretOrDer(der) => rs::UnparsedPublicKey::new(params, der)
                        .verify(msg, sig)
                        .map_err(fail),
                }
            }
            _ => Err(signature::Error::new()),
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    if !ALLOWED.contains(alg) {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.clone(),
    }))
}
