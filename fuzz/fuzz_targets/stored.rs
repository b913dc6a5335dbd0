//! Stored and changelog bytes (a state value, a position record, a manifest) through every
//! decoder, then against the aggregates' rules: a decoded state merged into a fresh one
//! answers as itself, and sealing it again decodes to the same value.
//!
//! The first byte picks a metric of the example configs; the rest is taken as is, and also
//! behind that metric's valid header, so the fuzzer reaches the body decoder without
//! guessing a 64-bit fingerprint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::aggregate::AggState;
use tally_fuzz::examples;

fuzz_target!(|data: &[u8]| {
    let _ = tally::store::PartitionMeta::decode(b"fuzz", data);
    let _ = tally::layout::Manifest::decode(data);
    let metrics: Vec<&tally::topology::Metric> = examples().iter().flat_map(|t| &t.metrics).collect();
    let Some((&pick, rest)) = data.split_first() else { return };
    let m = metrics[pick as usize % metrics.len()];
    let mut framed = vec![tally::store::STATE_FORMAT];
    framed.extend_from_slice(&m.layout.fingerprint.to_be_bytes());
    framed.extend_from_slice(rest);
    for bytes in [rest, &framed[..]] {
        let Ok(value) = m.layout.open(&m.name, b"fuzz", bytes) else { continue };
        for (state, spec) in value.states.iter().zip(&m.aggregates) {
            let mut fresh = AggState::new(&spec.kind);
            fresh.merge(state).expect("a state the gate let through merges into a fresh one of its kind");
            assert_eq!(fresh.to_json(&spec.kind), state.to_json(&spec.kind), "merging into a fresh state changed the answer");
        }
        let again = m.layout.open(&m.name, b"fuzz", &m.layout.seal(&value)).expect("sealed bytes open");
        assert_eq!(again, value, "seal and open round-trip");
    }
});
