//! A source record (bytes from Kafka) through the decoders of every shipped config's sources,
//! then each metric's filter and aggregates: errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_fuzz::examples;

fuzz_target!(|data: &[u8]| {
    let kafka_ts = data.first().map(|b| i64::from(*b) * 1_000_000_000_000 / 255);
    for topo in examples() {
        for (si, source) in topo.sources.iter().enumerate() {
            let mut record = tally::event::Record::default();
            if source.decoder.decode(data, kafka_ts, &mut record).is_err() {
                continue;
            }
            for m in topo.metrics.iter().filter(|m| m.source == si) {
                if m.filter.as_ref().is_some_and(|f| !f.matches(&record.values)) {
                    continue;
                }
                for a in &m.aggregates {
                    let mut state = tally::aggregate::AggState::new(&a.kind);
                    let _ = state.update(&a.kind, &record, 0, 0);
                }
            }
        }
    }
});
