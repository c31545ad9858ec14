//! Policy bundles (`policy::bundle::Bundle::parse`): the archive and manifest checks run
//! before the signature is checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mayfly::policy::bundle::Bundle::parse(data);
});
