//! CSR parsing and self-signature check (`mint::VerifiedCsr::parse`): the exchange and the
//! broker take a CSR from any caller, PEM or DER.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mayfly::mint::VerifiedCsr::parse(data);
});
