//! Query parameters as a client sends them: times, durations, position tokens.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = tally::query::parse_time("from", text);
    let _ = tally::config::parse_duration_ms(text);
    let _ = tally::query::parse_position("uvpv", text);
    if let Some((source, token)) = text.split_once('|') {
        let _ = tally::query::parse_position(source, token);
    }
});
