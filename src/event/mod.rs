//! Event decoding: a JSON record becomes a [`Record`] — its event time and the values of
//! the fields the topology uses, in fixed slots.
//!
//! Only the fields some metric reads are kept; the rest of the object is skipped without
//! being built, which is most of the decoding cost on wide records.
//!
//! Fields a source declares (`types`) are checked as they are read, by the rules of Flink's
//! JSON format (see [`FieldType`]): a record whose declared field holds another type, or
//! lacks a field declared `not null`, is invalid and never reaches the watermark.
//!
//! ```
//! use tally::event::{Decoder, Record, Value};
//! use tally::event::time::EventTime;
//! let dec = Decoder::new(vec![vec!["user".into()], vec!["ts".into()]], EventTime::EpochMillis { slot: 1 }, vec![]);
//! let mut rec = Record::default();
//! dec.decode(br#"{"user":"u1","ts":1672131000000,"other":[1,2]}"#, None, &mut rec).unwrap();
//! assert_eq!(rec.time_ms, 1_672_131_000_000);
//! assert_eq!(rec.values[0], Value::Str("u1".into()));
//! ```

pub mod time;

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use self::time::EventTime;
use crate::hash::KeyHash;

/// A field value as tally sees it. JSON objects and arrays are kept as their JSON text, so
/// they can still be grouped on or counted distinct.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub enum Value {
    /// Absent, or JSON `null`.
    #[default]
    Null,
    /// JSON `true`/`false`.
    Bool(bool),
    /// A JSON number without fraction or exponent that fits an `i64`.
    Int(i64),
    /// Any other JSON number.
    Float(f64),
    /// A JSON string.
    Str(Box<str>),
    /// The JSON text of an object or array.
    Json(Box<str>),
}

impl Value {
    /// The value as a number: numbers, and text that parses as one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::Str(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// Appends the value's canonical text: what group keys and sketches are built from, so
    /// `6` and `"6"` are the same user.
    pub fn write_text(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        match self {
            Value::Null => out.extend_from_slice(b"null"),
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::Int(i) => out.extend_from_slice(IntText::new(*i).as_bytes()),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                let _ = write!(out, "{}", *f as i64);
            }
            Value::Float(f) => {
                let _ = write!(out, "{f}");
            }
            Value::Str(s) | Value::Json(s) => out.extend_from_slice(s.as_bytes()),
        }
    }

    /// Calls `f` with the canonical text, without allocating for text and integers (the
    /// values sketches and top lists take on every record).
    pub fn with_text<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            Value::Str(s) | Value::Json(s) => f(s.as_bytes()),
            Value::Int(i) => f(IntText::new(*i).as_bytes()),
            other => f(other.to_text().as_bytes()),
        }
    }

    /// The canonical text as a `String`.
    pub fn to_text(&self) -> String {
        let mut v = Vec::new();
        self.write_text(&mut v);
        String::from_utf8(v).unwrap_or_default()
    }

    /// The value as JSON, for answers.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(f) => serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into),
            Value::Str(s) | Value::Json(s) => serde_json::Value::String(s.to_string()),
        }
    }
}

/// An integer's decimal text on the stack: `core::fmt` costs several times more per
/// record than the digits themselves.
struct IntText {
    buf: [u8; 20],
    start: usize,
}

impl IntText {
    fn new(i: i64) -> IntText {
        let mut t = IntText { buf: [0; 20], start: 20 };
        let mut n = i.unsigned_abs();
        loop {
            t.start -= 1;
            t.buf[t.start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if i < 0 {
            t.start -= 1;
            t.buf[t.start] = b'-';
        }
        t
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// A decoded record: its event time (epoch milliseconds, UTC) and one value per slot.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Event time, epoch milliseconds.
    pub time_ms: i64,
    /// Field values, indexed by the slots of the [`Decoder`] that filled them.
    pub values: Vec<Value>,
    /// The last text event time decoded into this record.
    pub time_memo: time::TimeMemo,
}

/// Why a record could not be decoded. Each variant is a `reason` label in metrics and in the
/// dead-letter topic's headers.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DecodeError {
    /// Not JSON at all.
    #[error("not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("the record is JSON but not an object")]
    NotAnObject,
    /// The event-time field is missing or null.
    #[error("event time field `{0}` is missing")]
    MissingTime(String),
    /// The event time is further ahead of the record's Kafka timestamp than the source
    /// allows: one such record would otherwise drag the watermark into the future and make
    /// every later record late.
    #[error("event time {time_ms} is more than {limit_ms} ms after the record's Kafka timestamp")]
    TooFarAhead {
        /// The event time, epoch ms.
        time_ms: i64,
        /// The source's `max_ahead`, ms.
        limit_ms: i64,
    },
    /// A declared field holds a value of another type.
    #[error("field `{field}` is declared {expected} but holds `{found}`")]
    WrongType {
        /// The field name.
        field: String,
        /// The declared type.
        expected: FieldType,
        /// What it held (cut short).
        found: String,
    },
    /// A field declared `not null` is missing or null.
    #[error("field `{0}` is declared not null but is missing")]
    MissingField(String),
    /// The record's key is not in a table it is looked up in (with `missing = "dead_letter"`).
    #[error("key `{key}` is not in table `{table}`")]
    LookupMissing {
        /// The table.
        table: String,
        /// The key looked up (cut short).
        key: String,
    },
    /// The event-time field is there but does not parse.
    #[error("event time field `{field}` has `{value}`: {why}")]
    BadTime {
        /// The field name.
        field: String,
        /// What it held.
        value: String,
        /// What was expected.
        why: String,
    },
}

impl DecodeError {
    /// A short, bounded label for metrics and headers.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::NotJson(_) => "not_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::MissingTime(_) => "missing_event_time",
            DecodeError::BadTime { .. } => "bad_event_time",
            DecodeError::TooFarAhead { .. } => "event_time_too_far_ahead",
            DecodeError::WrongType { .. } => "wrong_type",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::LookupMissing { .. } => "lookup_missing",
        }
    }
}

/// A declared field type, read by the rules of Flink's JSON format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// A JSON integer within 64 bits, or text holding one (`"42"`, `" -7 "`); not `1.5`,
    /// `1e3` or `true`.
    Int,
    /// A JSON number, or text holding a finite one.
    Float,
    /// A JSON string; numbers and booleans are read as their text. Not an object or array.
    String,
    /// `true` / `false`, or that text in any case.
    Bool,
}

impl FieldType {
    /// Parses a declaration: `int`, `float`, `string`, `bool`, or an SQL name for one of
    /// them (`BIGINT`, `DOUBLE`, `VARCHAR`, `BOOLEAN`, …), in any case.
    pub fn parse(name: &str) -> Option<FieldType> {
        Some(match name.to_ascii_lowercase().as_str() {
            "int" | "integer" | "bigint" | "smallint" | "tinyint" => FieldType::Int,
            "float" | "double" | "decimal" | "real" => FieldType::Float,
            "string" | "varchar" | "text" | "char" => FieldType::String,
            "bool" | "boolean" => FieldType::Bool,
            _ => return None,
        })
    }

    /// Reads `value` as this type: `Ok(None)` when it is one already, `Ok(Some(v))` when it
    /// reads as `v`, `Err(())` when it is of another type.
    fn coerce(self, value: &Value) -> Result<Option<Value>, ()> {
        let read = match (self, value) {
            (FieldType::Int, Value::Int(_))
            | (FieldType::Float, Value::Int(_) | Value::Float(_))
            | (FieldType::Bool, Value::Bool(_))
            | (FieldType::String, Value::Str(_)) => return Ok(None),
            (FieldType::Int, Value::Str(s)) => s.trim().parse::<i64>().ok().map(Value::Int),
            (FieldType::Float, Value::Str(s)) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()).map(Value::Float),
            (FieldType::Bool, Value::Str(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            (FieldType::String, Value::Int(_) | Value::Float(_) | Value::Bool(_)) => Some(Value::Str(value.to_text().into())),
            _ => None,
        };
        read.map(Some).ok_or(())
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::String => "string",
            FieldType::Bool => "bool",
        })
    }
}

/// A field a source declares: its slot, its type, and whether it must be present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedField {
    /// The slot holding it.
    pub slot: usize,
    /// Its type.
    pub ty: FieldType,
    /// `not null`: a record without it is invalid.
    pub required: bool,
}

/// Top-level key → the slots whose path starts there. Looked up once per key of every
/// record: with [`KeyHash`] rather than the default SipHash (on S1, SipHash was a tenth of
/// the core's instructions).
/// The slots each top-level key feeds, by the key's bytes (the record was checked for UTF-8
/// as a whole).
type KeySlots = HashMap<Box<[u8]>, Vec<usize>, KeyHash>;

/// Decodes JSON records of one source into [`Record`]s.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// Slot → path of object keys leading to the value.
    paths: Vec<Vec<String>>,
    /// Top-level key → the slots whose path starts there.
    top: KeySlots,
    /// `None`: the records carry no event time (a table's).
    time: Option<EventTime>,
    types: Vec<TypedField>,
}

impl Decoder {
    /// A decoder filling one slot per path, checking the declared `types`, reading the
    /// event time as `time` says.
    ///
    /// A slot with an empty path is not read from the record (it is filled later, by a
    /// table lookup).
    pub fn new(paths: Vec<Vec<String>>, time: EventTime, types: Vec<TypedField>) -> Decoder {
        Self::build(paths, Some(time), types)
    }

    /// A decoder of records without an event time (a table's values); their `time_ms` is 0.
    pub fn without_time(paths: Vec<Vec<String>>, types: Vec<TypedField>) -> Decoder {
        Self::build(paths, None, types)
    }

    fn build(paths: Vec<Vec<String>>, time: Option<EventTime>, types: Vec<TypedField>) -> Decoder {
        let mut top = KeySlots::default();
        for (slot, path) in paths.iter().enumerate() {
            if let Some(first) = path.first() {
                top.entry(first.as_bytes().into()).or_default().push(slot);
            }
        }
        Decoder { paths, top, time, types }
    }

    /// Decodes `payload` into `out`, reusing its allocation. `kafka_ts` is the record's
    /// Kafka timestamp (the year of date parts that have none).
    pub fn decode(&self, payload: &[u8], kafka_ts: Option<i64>, out: &mut Record) -> Result<(), DecodeError> {
        out.values.clear();
        out.values.resize(self.paths.len(), Value::Null);
        // JSON is UTF-8 throughout, the fields no metric reads included (a Flink JSON source
        // fails such a record too). Checked once for the whole record, so the parser need not
        // check each string it reads again.
        let text = std::str::from_utf8(payload).map_err(|e| DecodeError::NotJson(e.to_string()))?;
        let mut de = serde_json::Deserializer::from_str(text);
        match de.deserialize_any(RecordVisitor { decoder: self, out: &mut out.values }) {
            Ok(true) => {}
            Ok(false) => return Err(DecodeError::NotAnObject),
            Err(e) => return Err(DecodeError::NotJson(e.to_string())),
        }
        de.end().map_err(|e| DecodeError::NotJson(e.to_string()))?;
        for t in &self.types {
            let v = &mut out.values[t.slot];
            if *v == Value::Null {
                if t.required {
                    return Err(DecodeError::MissingField(self.paths[t.slot].join(".")));
                }
                continue;
            }
            match t.ty.coerce(v) {
                Ok(None) => {}
                Ok(Some(typed)) => *v = typed,
                Err(()) => {
                    let found = v.to_text().chars().take(64).collect();
                    return Err(DecodeError::WrongType { field: self.paths[t.slot].join("."), expected: t.ty, found });
                }
            }
        }
        out.time_ms = match &self.time {
            Some(t) => t.extract_with(&out.values, &self.paths, kafka_ts, &mut out.time_memo)?,
            None => 0,
        };
        Ok(())
    }
}

/// Visits the top-level value; `Ok(false)` means it was not an object.
struct RecordVisitor<'a> {
    decoder: &'a Decoder,
    out: &'a mut Vec<Value>,
}

impl<'de> Visitor<'de> for RecordVisitor<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while let Some(slots) = map.next_key_seed(KeySeed(&self.decoder.top))? {
            match slots {
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
                Some(slots) => {
                    let nested = slots.iter().any(|&s| self.decoder.paths[s].len() > 1);
                    if nested {
                        let v: serde_json::Value = map.next_value()?;
                        for &s in slots {
                            let path = &self.decoder.paths[s];
                            let inner = path[1..].iter().try_fold(&v, |v, k| v.get(k));
                            self.out[s] = inner.map_or(Value::Null, from_json);
                        }
                    } else {
                        let v = map.next_value_seed(ValueSeed)?;
                        for &s in slots {
                            self.out[s] = v.clone();
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_str<E>(self, _: &str) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E>(self) -> Result<bool, E> {
        Ok(false)
    }
}

/// Looks a key up without allocating it; yields the slots it feeds, if any.
struct KeySeed<'a>(&'a KeySlots);

impl<'de, 'a> DeserializeSeed<'de> for KeySeed<'a> {
    type Value = Option<&'a Vec<usize>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de, 'a> Visitor<'de> for KeySeed<'a> {
    type Value = Option<&'a Vec<usize>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.get(key.as_bytes()))
    }
    fn visit_bytes<E>(self, key: &[u8]) -> Result<Self::Value, E> {
        Ok(self.0.get(key))
    }
}

/// Reads one JSON value as a [`Value`].
struct ValueSeed;

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(i64::try_from(u).map_or(Value::Float(u as f64), Value::Int))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Float(f))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Str(s.into()))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Value, A::Error> {
        let v = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
        Ok(Value::Json(v.to_string().into()))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
        let v = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Value::Json(v.to_string().into()))
    }
}

fn from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => n.as_i64().map_or_else(|| Value::Float(n.as_f64().unwrap_or(f64::NAN)), Value::Int),
        serde_json::Value::String(s) => Value::Str(s.as_str().into()),
        other => Value::Json(other.to_string().into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoder() -> Decoder {
        Decoder::new(
            vec![vec!["a".into()], vec!["n".into(), "x".into()], vec!["t".into()], vec!["n".into(), "y".into()]],
            EventTime::EpochSeconds { slot: 2 },
            vec![],
        )
    }

    #[test]
    fn keys_match_by_their_unescaped_bytes() {
        let mut r = Record::default();
        decoder().decode(br#"{"\u0061":"hi","t":100}"#, None, &mut r).unwrap();
        assert_eq!(r.values[0], Value::Str("hi".into()), "an escaped key is the key it spells");
        for bad in [&b"{\"\xff\":1,\"a\":\"x\",\"t\":1}"[..], b"{\"z\":\"\xfe\",\"a\":\"x\",\"t\":1}", b"{\"a\":\"\xff\",\"t\":1}"] {
            assert!(matches!(decoder().decode(bad, None, &mut r), Err(DecodeError::NotJson(_))), "JSON is UTF-8, in fields no metric reads too");
        }
    }

    #[test]
    fn a_repeated_text_time_is_read_again_only_when_it_changes() {
        let dec = Decoder::new(vec![vec!["t".into()]], EventTime::text(0, "%Y-%m-%d %H:%M:%S", "Asia/Shanghai").unwrap(), vec![]);
        let mut r = Record::default();
        for (text, ms) in
            [("2021-09-06 16:00:00", 1_630_915_200_000), ("2021-09-06 16:00:00", 1_630_915_200_000), ("2021-09-06 16:00:01", 1_630_915_201_000)]
        {
            dec.decode(format!(r#"{{"t":"{text}"}}"#).as_bytes(), None, &mut r).unwrap();
            assert_eq!(r.time_ms, ms);
        }
        let utc = Decoder::new(vec![vec!["t".into()]], EventTime::text(0, "%Y-%m-%d %H:%M:%S", "UTC").unwrap(), vec![]);
        utc.decode(br#"{"t":"2021-09-06 16:00:01"}"#, None, &mut r).unwrap();
        assert_eq!(r.time_ms, 1_630_915_201_000 + 8 * 3_600_000, "the memo is the zone's too");
    }

    #[test]
    fn keeps_wanted_fields_including_nested_ones() {
        let mut r = Record::default();
        decoder().decode(br#"{"z":{"deep":[1,{"q":2}]},"a":"hi","n":{"x":1.5,"y":[1]},"t":100}"#, None, &mut r).unwrap();
        assert_eq!(r.time_ms, 100_000);
        assert_eq!(r.values, vec![Value::Str("hi".into()), Value::Float(1.5), Value::Int(100), Value::Json("[1]".into())]);
    }

    #[test]
    fn bad_records_get_a_reason() {
        let d = decoder();
        let mut r = Record::default();
        let reason = |p: &[u8]| d.decode(p, None, &mut Record::default()).unwrap_err().reason();
        assert_eq!(reason(br#"{"a":"#), "not_json");
        assert_eq!(reason(br#"{"a":1} trailing"#), "not_json");
        assert_eq!(reason(b"\xff\xfe"), "not_json");
        assert_eq!(reason(br#"[1,2]"#), "not_an_object");
        assert_eq!(reason(br#""text""#), "not_an_object");
        assert_eq!(reason(br#"{"a":1}"#), "missing_event_time");
        assert_eq!(reason(br#"{"t":"abc"}"#), "bad_event_time");
        d.decode(br#"{"t":"12"}"#, None, &mut r).unwrap();
        assert_eq!(r.time_ms, 12_000, "numeric text is a number");
    }

    #[test]
    fn declared_types_follow_flinks_json_rules() {
        let typed = |ty: &str, required: bool| {
            let field = TypedField { slot: 0, ty: FieldType::parse(ty).unwrap(), required };
            Decoder::new(vec![vec!["f".into()], vec!["t".into()]], EventTime::EpochSeconds { slot: 1 }, vec![field])
        };
        let read = |d: &Decoder, f: &str| {
            let mut r = Record::default();
            d.decode(format!(r#"{{"t":1{}}}"#, if f.is_empty() { String::new() } else { format!(",\"f\":{f}") }).as_bytes(), None, &mut r)
                .map(|_| r.values[0].clone())
                .map_err(|e| e.reason())
        };
        let int = typed("BIGINT", false);
        assert_eq!(read(&int, "42"), Ok(Value::Int(42)));
        assert_eq!(read(&int, r#"" -7 ""#), Ok(Value::Int(-7)), "text holding an integer");
        for bad in ["1.5", "1e3", "6.0", r#""zero""#, "true", "[1]", r#"{"a":1}"#, "18446744073709551615", r#""1.5""#] {
            assert_eq!(read(&int, bad), Err("wrong_type"), "{bad}");
        }
        assert_eq!(read(&int, ""), Ok(Value::Null), "absent and nullable");
        assert_eq!(read(&typed("int", true), "null"), Err("missing_field"));
        let float = typed("double", false);
        assert_eq!(read(&float, r#""2.5""#), Ok(Value::Float(2.5)));
        assert_eq!(read(&float, r#""NaN""#), Err("wrong_type"));
        let string = typed("VARCHAR", false);
        assert_eq!(read(&string, "6"), Ok(Value::Str("6".into())), "a number read as its text");
        assert_eq!(read(&string, "[6]"), Err("wrong_type"));
        let boolean = typed("boolean", false);
        assert_eq!(read(&boolean, r#"" TRUE""#), Ok(Value::Bool(true)));
        assert_eq!(read(&boolean, "1"), Err("wrong_type"));
        assert_eq!(FieldType::parse("date"), None);
    }

    #[test]
    fn canonical_text_unifies_numbers_and_numeric_text() {
        assert_eq!(Value::Int(6).to_text(), "6");
        for i in [0, -1, 9, 10, -10, 1234567890, i64::MAX, i64::MIN, i64::MIN + 1] {
            assert_eq!(Value::Int(i).to_text(), format!("{i}"));
            assert_eq!(Value::Int(i).with_text(|t| t.to_vec()), format!("{i}").into_bytes());
        }
        assert_eq!(Value::Float(6.0).to_text(), "6");
        assert_eq!(Value::Float(6.5).to_text(), "6.5");
        assert_eq!(Value::Str("6".into()).to_text(), "6");
    }
}
