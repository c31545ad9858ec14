//! The JSON body of `POST /v1/exchange`, which anyone on the network can send before their
//! id-token is verified (after the listener's size limit).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mayfly::api::exchange::parse_json_body(data);
});
