//! Event time: where it is in a record and how it becomes epoch milliseconds (UTC).
//!
//! ```
//! use tally::event::{time::EventTime, Value};
//! let t = EventTime::text(0, "%Y-%m-%d %H:%M:%S", "Asia/Shanghai").unwrap();
//! let ms = t.extract(&[Value::Str("2021-09-06 16:00:00".into())], &[vec!["create_time".into()]], None).unwrap();
//! assert_eq!(ms, 1_630_915_200_000); // 08:00 UTC
//! ```

use chrono::{Datelike, LocalResult, NaiveDate, NaiveDateTime, TimeZone};
use chrono_tz::Tz;

use super::{DecodeError, Value};

/// How a source's event time is read.
#[derive(Debug, Clone)]
pub enum EventTime {
    /// A number (or numeric text) of seconds since the epoch.
    EpochSeconds {
        /// The slot holding it.
        slot: usize,
    },
    /// A number (or numeric text) of milliseconds since the epoch.
    EpochMillis {
        /// The slot holding it.
        slot: usize,
    },
    /// Text in a strftime `format`, read as local time in `tz`.
    Text {
        /// The slot holding it.
        slot: usize,
        /// strftime format.
        format: String,
        /// Zone of the local time.
        tz: Tz,
    },
    /// Separate date/time parts (S4 has only `month` and `day`), local time in `tz`.
    Parts {
        /// Slots of year, month, day, hour, minute, second; `None` where absent.
        slots: [Option<usize>; 6],
        /// The year when no slot gives one; `None`: the year that puts the time closest to
        /// the record's Kafka timestamp (its own year in `tz`, but around New Year).
        year: Option<i32>,
        /// Zone of the local time.
        tz: Tz,
    },
}

/// Largest magnitude of an event time, ms (about year 255,500): inside the dates chrono and
/// the zone rules cover (±262,143 years), with room for the longest window, and far from
/// `i64` overflow. Query times are held to the same bound.
pub const MAX_TIME_MS: i64 = 8_000_000_000_000_000;

/// Names of the [`EventTime::Parts`] parts, in slot order.
pub const PART_NAMES: [&str; 6] = ["year", "month", "day", "hour", "minute", "second"];

/// The common `YYYY-MM-DD HH:MM:SS` layout, parsed by hand because it is most of the seeds'
/// traffic and chrono's general parser costs several times more.
const FAST_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

impl EventTime {
    /// A text event time; fails on an unknown zone name.
    pub fn text(slot: usize, format: &str, tz: &str) -> Result<EventTime, String> {
        Ok(EventTime::Text { slot, format: format.to_string(), tz: parse_tz(tz)? })
    }

    /// Reads the event time out of decoded `values`; `paths` name the fields in errors,
    /// `kafka_ts` (the record's Kafka timestamp) gives date parts their year if nothing else
    /// does.
    pub fn extract(&self, values: &[Value], paths: &[Vec<String>], kafka_ts: Option<i64>) -> Result<i64, DecodeError> {
        self.extract_with(values, paths, kafka_ts, &mut TimeMemo::default())
    }

    /// [`EventTime::extract`], answering a text time equal to the last one `memo` read at
    /// once: records of one second share their text, and parsing it and finding its zone's
    /// offset were a tenth of the processing.
    pub fn extract_with(&self, values: &[Value], paths: &[Vec<String>], kafka_ts: Option<i64>, memo: &mut TimeMemo) -> Result<i64, DecodeError> {
        let field = |slot: usize| paths[slot].join(".");
        let present = |slot: usize| match &values[slot] {
            Value::Null => Err(DecodeError::MissingTime(field(slot))),
            v => Ok(v),
        };
        let bad = |slot: usize, v: &Value, why: &str| DecodeError::BadTime {
            field: field(slot),
            value: v.to_text().chars().take(64).collect(),
            why: why.to_string(),
        };
        match self {
            EventTime::EpochSeconds { slot } | EventTime::EpochMillis { slot } => {
                let v = present(*slot)?;
                let n = v.as_f64().filter(|n| n.is_finite()).ok_or_else(|| bad(*slot, v, "expected a number"))?;
                // Seconds are rounded to the microsecond first: `1091837578.110` is not exact
                // in binary, and its product with 1000 would floor to …109.
                let ms = if matches!(self, EventTime::EpochSeconds { .. }) { (n * 1e6).round() / 1e3 } else { n };
                if ms.abs() > MAX_TIME_MS as f64 {
                    return Err(bad(*slot, v, "out of range"));
                }
                Ok(ms.floor() as i64)
            }
            EventTime::Text { slot, format, tz } => {
                let v = present(*slot)?;
                let Value::Str(s) = v else {
                    return Err(bad(*slot, v, &format!("expected text in format `{format}`")));
                };
                if let Some(ms) = memo.get(s, format, tz) {
                    return Ok(ms);
                }
                let local = parse_local(s, format).ok_or_else(|| bad(*slot, v, &format!("does not match format `{format}`")))?;
                let ms = to_utc_ms(tz, local).ok_or_else(|| bad(*slot, v, "does not exist in that time zone"))?;
                memo.set(s, format, tz, ms);
                Ok(ms)
            }
            EventTime::Parts { slots, year, tz } => {
                let mut parts = [0, 1, 1, 0, 0, 0];
                for (i, s) in slots.iter().enumerate() {
                    if let Some(s) = *s {
                        let v = present(s)?;
                        parts[i] =
                            v.as_f64().filter(|n| n.fract() == 0.0 && n.abs() < 1.0e6).ok_or_else(|| bad(s, v, "expected a whole number"))? as i64;
                    }
                }
                let first = slots.iter().flatten().next().copied().unwrap_or(0);
                let at = |y: i64| {
                    let local = NaiveDate::from_ymd_opt(y as i32, parts[1] as u32, parts[2] as u32)?.and_hms_opt(
                        parts[3] as u32,
                        parts[4] as u32,
                        parts[5] as u32,
                    )?;
                    to_utc_ms(tz, local)
                };
                let t = match (slots[0], year, kafka_ts) {
                    (Some(_), _, _) => at(parts[0]),
                    (None, Some(y), _) => at(*y as i64),
                    (None, None, Some(ts)) => {
                        let y = chrono::DateTime::from_timestamp_millis(ts).map_or(1970, |d| d.with_timezone(tz).year()) as i64;
                        (y - 1..=y + 1).filter_map(at).min_by_key(|t| t.abs_diff(ts))
                    }
                    (None, None, None) => return Err(bad(first, &values[first], "has no year, and the record no Kafka timestamp to take it from")),
                };
                t.ok_or_else(|| bad(first, &values[first], "not a valid date in that time zone"))
            }
        }
    }
}

/// Parses an IANA zone name (`UTC`, `Asia/Shanghai`, ...).
pub fn parse_tz(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| format!("`{name}` is not an IANA time zone name (e.g. `UTC`, `Asia/Shanghai`)"))
}

/// The last text time read and what it was, kept by whoever decodes records one after
/// another (a [`crate::event::Record`]).
#[derive(Debug, Clone, Default)]
pub struct TimeMemo {
    text: String,
    format: String,
    tz: Option<Tz>,
    ms: i64,
}

impl TimeMemo {
    fn get(&self, text: &str, format: &str, tz: &Tz) -> Option<i64> {
        (self.tz.as_ref() == Some(tz) && self.text == text && self.format == format).then_some(self.ms)
    }

    fn set(&mut self, text: &str, format: &str, tz: &Tz, ms: i64) {
        self.text.clear();
        self.text.push_str(text);
        self.format.clear();
        self.format.push_str(format);
        self.tz = Some(*tz);
        self.ms = ms;
    }
}

fn parse_local(s: &str, format: &str) -> Option<NaiveDateTime> {
    // The fast path takes the common well-formed text; anything else gets chrono's rules, so
    // both read the same texts.
    if format == FAST_FORMAT {
        if let Some(t) = parse_fast(s.as_bytes()) {
            return Some(t);
        }
    }
    NaiveDateTime::parse_from_str(s, format).ok().or_else(|| NaiveDate::parse_from_str(s, format).ok().and_then(|d| d.and_hms_opt(0, 0, 0)))
}

fn parse_fast(b: &[u8]) -> Option<NaiveDateTime> {
    if b.len() != 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num =
        |r: std::ops::Range<usize>| -> Option<u32> { b[r].iter().try_fold(0u32, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + (c - b'0') as u32)) };
    NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?.and_hms_opt(num(11..13)?, num(14..16)?, num(17..19)?)
}

fn to_utc_ms(tz: &Tz, local: NaiveDateTime) -> Option<i64> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.timestamp_millis()),
        // In a fall-back hour the earlier instant is the one a wall clock showed first.
        LocalResult::Ambiguous(a, _) => Some(a.timestamp_millis()),
        LocalResult::None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(n: usize) -> Vec<Vec<String>> {
        (0..n).map(|i| vec![format!("f{i}")]).collect()
    }

    #[test]
    fn text_times_in_zones() {
        let sh = EventTime::text(0, FAST_FORMAT, "Asia/Shanghai").unwrap();
        let utc = EventTime::text(0, FAST_FORMAT, "UTC").unwrap();
        let v = [Value::Str("2021-09-06 00:00:00".into())];
        assert_eq!(utc.extract(&v, &paths(1), None).unwrap() - sh.extract(&v, &paths(1), None).unwrap(), 8 * 3_600_000);
        // The fast path and chrono's parser agree, on texts the fast path does not take too.
        let slow = EventTime::text(0, "%Y-%m-%d %H:%M:%S%.f", "Asia/Shanghai").unwrap();
        assert_eq!(slow.extract(&v, &paths(1), None).unwrap(), sh.extract(&v, &paths(1), None).unwrap());
        let unpadded = [Value::Str("2021-9-6 0:00:00".into())];
        assert_eq!(sh.extract(&unpadded, &paths(1), None).unwrap(), sh.extract(&v, &paths(1), None).unwrap());
        // A date-only format is midnight.
        let day = EventTime::text(0, "%Y-%m-%d", "UTC").unwrap();
        assert_eq!(day.extract(&[Value::Str("1970-01-02".into())], &paths(1), None).unwrap(), 86_400_000);
        for bad in ["2021-13-45 99:00:00", "yesterday", "2021-09-06T00:00:00"] {
            let e = sh.extract(&[Value::Str(bad.into())], &paths(1), None).unwrap_err();
            assert_eq!(e.reason(), "bad_event_time", "{bad}");
        }
        // A New York spring-forward gap has no instant.
        let ny = EventTime::text(0, FAST_FORMAT, "America/New_York").unwrap();
        assert!(ny.extract(&[Value::Str("2021-03-14 02:30:00".into())], &paths(1), None).is_err());
    }

    #[test]
    fn epoch_seconds_and_millis() {
        let s = EventTime::EpochSeconds { slot: 0 };
        let ms = EventTime::EpochMillis { slot: 0 };
        assert_eq!(s.extract(&[Value::Int(1_672_131_000)], &paths(1), None).unwrap(), 1_672_131_000_000);
        assert_eq!(s.extract(&[Value::Float(1.5)], &paths(1), None).unwrap(), 1_500);
        assert_eq!(s.extract(&[Value::Float(1_091_837_578.110)], &paths(1), None).unwrap(), 1_091_837_578_110, "not …109");
        assert_eq!(ms.extract(&[Value::Int(1_672_131_000_123)], &paths(1), None).unwrap(), 1_672_131_000_123);
        assert_eq!(ms.extract(&[Value::Null], &paths(1), None).unwrap_err().reason(), "missing_event_time");
        assert_eq!(ms.extract(&[Value::Str("abc".into())], &paths(1), None).unwrap_err().reason(), "bad_event_time");
        assert_eq!(ms.extract(&[Value::Float(1e300)], &paths(1), None).unwrap_err().reason(), "bad_event_time");
    }

    #[test]
    fn date_parts_with_a_fixed_year() {
        let t = EventTime::Parts { slots: [None, Some(0), Some(1), None, None, None], year: Some(2021), tz: parse_tz("Asia/Shanghai").unwrap() };
        let got = t.extract(&[Value::Int(11), Value::Int(11)], &paths(2), None).unwrap();
        assert_eq!(got, 1_636_560_000_000); // 2021-11-11 00:00 +08:00
        assert!(t.extract(&[Value::Int(2), Value::Int(30)], &paths(2), None).is_err());
        assert!(t.extract(&[Value::Int(2), Value::Float(1.5)], &paths(2), None).is_err());
    }

    #[test]
    fn date_parts_take_their_year_from_the_kafka_timestamp() {
        let t = EventTime::Parts { slots: [None, Some(0), Some(1), None, None, None], year: None, tz: parse_tz("Asia/Shanghai").unwrap() };
        let nov11 = 1_636_560_000_000; // 2021-11-11 00:00 +08:00
        assert_eq!(t.extract(&[Value::Int(11), Value::Int(11)], &paths(2), Some(nov11 + 3_600_000)).unwrap(), nov11);
        // Sent just after New Year (Shanghai time), about New Year's Eve: the year before.
        let jan1 = 1_640_966_400_000; // 2022-01-01 00:00 +08:00
        assert_eq!(t.extract(&[Value::Int(12), Value::Int(31)], &paths(2), Some(jan1 + 60_000)).unwrap(), jan1 - 86_400_000);
        assert_eq!(t.extract(&[Value::Int(11), Value::Int(11)], &paths(2), None).unwrap_err().reason(), "bad_event_time");
        // 29 February exists only in leap years: 2024, not 2023.
        let got = t.extract(&[Value::Int(2), Value::Int(29)], &paths(2), Some(1_708_000_000_000)).unwrap();
        assert_eq!(got, 1_709_136_000_000, "2024-02-29 00:00 +08:00");
    }
}
