//! Identity tokens: arbitrary bytes through parsing and verification against fixed keys
//! (alg confusion, kid games, malformed base64 and JSON), and arbitrary claims, signed
//! with the trusted key, through the claim checks and every preset's normalisation.
#![no_main]

use latchkey::identity::jwks::VerifyKey;
use latchkey::identity::{verify_with_key, IssuerConfig, Preset};
use latchkey::jose::{Alg, SigningKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::Duration;

const ISS: &str = "https://issuer.fuzz";
const NOW: i64 = 1_900_000_000;

struct Keys {
    es: SigningKey,
    es_pub: VerifyKey,
    rs_pub: VerifyKey,
}

fn keys() -> &'static Keys {
    static K: OnceLock<Keys> = OnceLock::new();
    K.get_or_init(|| {
        let (es, _) = SigningKey::generate(Alg::ES256).unwrap();
        let (rs, _) = SigningKey::generate(Alg::RS256).unwrap();
        let es_pub = VerifyKey::from_jwk(&es.public_jwk()).unwrap();
        let rs_pub = VerifyKey::from_jwk(&rs.public_jwk()).unwrap();
        Keys { es, es_pub, rs_pub }
    })
}

fn issuer(preset: Preset) -> IssuerConfig {
    IssuerConfig {
        name: "fuzz".into(),
        preset,
        issuer: ISS.into(),
        audiences: vec!["aud".into()],
        jwks_url: None,
        leeway: Duration::from_secs(30),
        max_token_age: Some(Duration::from_secs(3600)),
        algorithms: vec![Alg::ES256, Alg::RS256, Alg::EdDSA],
        jwks_refresh: Duration::from_secs(300),
        jwks_cooldown: Duration::from_secs(30),
        jwks_max_staleness: Duration::from_secs(86_400),
        jwks_max_bytes: 1 << 18,
        jwks_max_keys: 100,
        max_mints_per_token: Some(1),
        ca_file: None,
        key_environment: true,
    }
}

const PRESETS: [Preset; 5] = [
    Preset::Bitbucket,
    Preset::Github,
    Preset::Gitlab,
    Preset::Kubernetes,
    Preset::Generic,
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let k = keys();
    let cfg = issuer(PRESETS[(mode as usize / 2) % PRESETS.len()]);
    if mode % 2 == 0 {
        // Bytes as a token, against both key types.
        if let Ok(token) = std::str::from_utf8(rest) {
            for key in [&k.es_pub, &k.rs_pub] {
                if let Ok(id) = verify_with_key(token, &cfg, key, NOW) {
                    // Only a genuine signature gets here.
                    assert!(!id.key.is_empty());
                }
            }
        }
    } else if let Ok(serde_json::Value::Object(claims)) =
        serde_json::from_slice::<serde_json::Value>(rest)
    {
        // Claims of the fuzzer's choosing, validly signed.
        let token =
            k.es.sign_jwt(&serde_json::Value::Object(claims), None)
                .unwrap();
        if let Ok(id) = verify_with_key(&token, &cfg, &k.es_pub, NOW) {
            assert!(!id.key.is_empty());
            assert!(id.key.starts_with("fuzz:"));
        }
    }
});
