//! The workload socket's HTTP/2 filter (`api::authority`), which every local user reaches
//! before attestation: any byte stream after the client preface. It must end the
//! connection or hand the server frames, never panic, and never hold more than its limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::api::authority::AuthorityFix;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(data);
    if let Ok(out) = AuthorityFix::filter(&input) {
        assert!(out.starts_with(PREFACE));
    }
});
