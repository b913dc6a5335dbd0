//! Filter / having expressions and aggregate specs as a config gives them: parsed (errors,
//! never a panic), and a parsed filter evaluated on a few records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::event::Value;

const FIELDS: [&str; 4] = ["a", "b", "user_id", "x.y"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let slot = |name: &str| FIELDS.iter().position(|f| *f == name);
    if let Ok(f) = tally::filter::Filter::parse(text, slot) {
        for values in [
            vec![Value::Null, Value::Null, Value::Null, Value::Null],
            vec![Value::Int(0), Value::Float(-1.5), Value::Str("1".into()), Value::Bool(true)],
            vec![Value::Int(i64::MIN), Value::Float(f64::NAN), Value::Json("[]".into()), Value::Int(i64::MAX)],
        ] {
            let _ = f.matches(&values);
        }
    }
    let mut next = 0;
    let _ = tally::aggregate::AggregateSpec::parse(text, |_| {
        next += 1;
        next - 1
    });
});
