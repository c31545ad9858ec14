//! SPIFFE IDs, trust domains, selectors and lifetimes as callers send them (the requested
//! `spiffe_id`, audiences, `ttl`), and the inventory that names them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::identity::{Inventory, Selector, TrustDomain, Ttl, WorkloadId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(id) = WorkloadId::parse(text) {
        // What parses prints back as something that parses to the same ID.
        assert_eq!(WorkloadId::parse(&id.to_string()).ok(), Some(id));
    }
    let _ = TrustDomain::parse(text);
    let _ = Selector::parse(text);
    let _ = Ttl::parse(text);
    if let Ok(td) = TrustDomain::parse("example.org") {
        let _ = Inventory::parse(text, &td);
    }
});
