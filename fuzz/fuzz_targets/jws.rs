//! Compact JWS/JWT parsing before any key is known: id-tokens presented to the exchange,
//! JWT-SVIDs presented for validation, Workload Proof Tokens.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::attest::oidc::{GithubSubject, OidcVerifier};

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    if let Ok(compact) = mayfly::mint::jws::parse(token, 16 * 1024) {
        let _ = compact.header_str("alg");
        let _ = compact.verifies_with(&[4u8; 65]);
    }
    let _ = OidcVerifier::claimed_issuer(token);
    let _ = GithubSubject::parse(token);
});
