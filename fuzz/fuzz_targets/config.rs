//! The configuration file: TOML into `RawConfig`, then validation into `Config`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly::config::{Config, RawConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(raw) = toml::from_str::<RawConfig>(text) {
        let _ = Config::try_from(raw);
    }
});
