//! Config text: loaded, validated, compiled and explained — errors naming the key, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = tally::config::Config::from_toml_str(text) {
        if let Ok(topo) = tally::topology::Topology::compile(&cfg) {
            let _ = topo.explain();
        }
    }
});
