//! Windows, stored as slices, laid out on a zone's wall clock.
//!
//! Like Flink's window table functions, tally stores each record once, in the *slice* its
//! event time falls in, and builds a window by merging its slices when asked:
//!
//! | window                    | slice              | a window is                        |
//! |---------------------------|--------------------|------------------------------------|
//! | tumbling `size`           | `size`             | one slice                          |
//! | hopping `size`/`slide`    | gcd(size, slide)   | size/gcd consecutive slices        |
//! | cumulate `step`/`max`     | `step`             | the first k slices of a `max` span |
//! | global                    | everything         | the one slice                      |
//!
//! A cumulative day with one-minute steps thus costs one update per record, not 1,440.
//!
//! # Zones
//!
//! Boundaries are multiples of the window's lengths on the *local* clock of its zone (UTC by
//! default), counted from local midnight of 1970-01-01: a day window runs from local
//! midnight to local midnight by the zone's rules at that date, so it is 23 or 25 hours long
//! across a daylight-saving change. A boundary is the first instant at which the local clock
//! shows it (a boundary inside a spring-forward gap is the instant the clock jumps past
//! it), so windows are contiguous, non-overlapping intervals of real time: the repeated
//! hour of a fall-back change belongs to the window that ends after it. All times handed in
//! and out are UTC epoch milliseconds.
//!
//! # Lateness
//!
//! A record counts for a window iff the window's end + grace is after the watermark before
//! the record (Kafka Streams' rule, and Flink's for every window not yet fired): see
//! [`WindowSpec::place`]. A record that is late for the first windows of its slice but not
//! for later ones is kept apart from the slice's other records, tagged with the end of the
//! first window it counts for, so a window that has closed never changes.
//!
//! ```
//! use tally::window::{Window, WindowSpec, Zone};
//! let hop = WindowSpec::hopping(10 * 60_000, 5 * 60_000, Zone::Utc).unwrap();
//! let t = 7 * 60_000; // 00:07
//! assert_eq!(hop.slice_start(t), 5 * 60_000);
//! assert_eq!(hop.windows_containing(t), vec![Window { start: 0, end: 600_000 }, Window { start: 300_000, end: 900_000 }]);
//! ```

use chrono::{DateTime, LocalResult, Offset, TimeZone};
use chrono_tz::{GapInfo, Tz};
use serde::{Serialize, Serializer};

/// Where windows begin and how long they are, in local milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WindowKind {
    /// Fixed, non-overlapping windows.
    Tumbling {
        /// Length, ms.
        size_ms: i64,
    },
    /// Fixed windows starting every `slide_ms`.
    Hopping {
        /// Length, ms.
        size_ms: i64,
        /// Distance between starts, ms.
        slide_ms: i64,
    },
    /// Windows that grow by `step_ms` from the start of each `max_ms` span (Flink's CUMULATE).
    Cumulate {
        /// Growth step, ms.
        step_ms: i64,
        /// Span, ms.
        max_ms: i64,
    },
    /// One window for all time.
    Global,
}

/// The clock window boundaries are laid out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    /// UTC: local time is epoch time.
    Utc,
    /// An IANA zone, by its rules at each date.
    Named(Tz),
}

impl Serialize for Zone {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Zone::Utc => s.serialize_str("UTC"),
            Zone::Named(tz) => s.serialize_str(tz.name()),
        }
    }
}

/// The most a zone's offset can be from UTC (today +14 h in Kiribati; local mean times of the
/// 19th century reach +15:02), with room to spare.
const MAX_OFFSET_MS: i64 = 16 * 3_600_000;

/// The most a backward change of the clock repeats: an hour at most daylight-saving changes,
/// three at Antarctica/Casey's, a day where a zone moved across the date line (Kwajalein
/// 1969, Juneau 1867).
const MAX_REPEAT_MS: i64 = 26 * 3_600_000;

impl Zone {
    /// The local clock's reading at instant `t`, ms.
    fn wall(tz: Tz, t: i64) -> i64 {
        match DateTime::from_timestamp_millis(t) {
            Some(dt) => t + tz.offset_from_utc_datetime(&dt.naive_utc()).fix().local_minus_utc() as i64 * 1000,
            None => t,
        }
    }

    /// The first instant at which the local clock shows at least `l`: the earlier of a
    /// repeated time, and the end of a gap for a time the clock skips.
    #[inline]
    pub fn instant(self, l: i64) -> i64 {
        match self {
            Zone::Utc => l,
            Zone::Named(tz) => Self::named_instant(tz, l),
        }
    }

    fn named_instant(tz: Tz, l: i64) -> i64 {
        let Some(local) = DateTime::from_timestamp_millis(l).map(|d| d.naive_utc()) else { return l };
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) => t.timestamp_millis(),
            LocalResult::Ambiguous(a, b) => a.timestamp_millis().min(b.timestamp_millis()),
            LocalResult::None => match GapInfo::new(&local, &tz).and_then(|g| g.end) {
                Some(end) => end.timestamp_millis(),
                None => l,
            },
        }
    }

    /// The local time of instant `t` for laying out windows: the latest local time whose
    /// first instant is at or before `t`. That is the clock's reading, except in the second
    /// pass through a repeated hour, which counts as the end of that hour.
    #[inline]
    pub fn local(self, t: i64) -> i64 {
        match self {
            Zone::Utc => t,
            Zone::Named(tz) => self.named_local(tz, t),
        }
    }

    fn named_local(self, tz: Tz, t: i64) -> i64 {
        let wall = Self::wall(tz, t);
        if wall == i64::MAX || self.instant(wall + 1) > t {
            return wall;
        }
        // Repeated hour: find the latest local time whose first instant is not after `t`.
        let (mut lo, mut hi) = (wall + 1, wall.saturating_add(MAX_REPEAT_MS + 1));
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.instant(mid) <= t {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// A window kind plus the clock it is laid out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowSpec {
    /// The kind and its sizes.
    #[serde(flatten)]
    pub kind: WindowKind,
    /// The zone whose local clock the boundaries follow.
    #[serde(rename = "timezone")]
    pub zone: Zone,
}

/// A window, `[start, end)` in epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Window {
    /// First millisecond inside.
    pub start: i64,
    /// First millisecond after.
    pub end: i64,
}

/// The start and end used for the global window.
pub const GLOBAL: Window = Window { start: 0, end: i64::MAX };

/// Which of the windows holding a record it counts for (see [`WindowSpec::place`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Every one.
    All,
    /// Those ending at or after this instant; the earlier ones have closed.
    From(i64),
    /// None: every window holding it has closed.
    Late,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn floor(l: i64, len: i64) -> i64 {
    l.div_euclid(len) * len
}

impl WindowSpec {
    /// A tumbling window of `size_ms`.
    pub fn tumbling(size_ms: i64, zone: Zone) -> Result<Self, String> {
        positive("size", size_ms)?;
        Ok(WindowSpec { kind: WindowKind::Tumbling { size_ms }, zone })
    }

    /// A hopping window; `slide_ms` must not exceed `size_ms`.
    pub fn hopping(size_ms: i64, slide_ms: i64, zone: Zone) -> Result<Self, String> {
        positive("size", size_ms)?;
        positive("slide", slide_ms)?;
        if slide_ms > size_ms {
            return Err(format!("slide ({slide_ms} ms) must not exceed size ({size_ms} ms); gaps between windows would drop records"));
        }
        at_most_windows("size / slide", size_ms, slide_ms)?;
        Ok(WindowSpec { kind: WindowKind::Hopping { size_ms, slide_ms }, zone })
    }

    /// A cumulative window; `max_ms` must be a whole number of steps.
    pub fn cumulate(step_ms: i64, max_ms: i64, zone: Zone) -> Result<Self, String> {
        positive("step", step_ms)?;
        positive("max", max_ms)?;
        if max_ms % step_ms != 0 {
            return Err(format!("max ({max_ms} ms) must be a whole multiple of step ({step_ms} ms)"));
        }
        at_most_windows("max / step", max_ms, step_ms)?;
        Ok(WindowSpec { kind: WindowKind::Cumulate { step_ms, max_ms }, zone })
    }

    /// The all-time window.
    pub fn global() -> Self {
        WindowSpec { kind: WindowKind::Global, zone: Zone::Utc }
    }

    /// Length of a slice on the local clock, ms (`i64::MAX` for global).
    fn slice_ms(&self) -> i64 {
        match self.kind {
            WindowKind::Tumbling { size_ms } => size_ms,
            WindowKind::Hopping { size_ms, slide_ms } => gcd(size_ms, slide_ms),
            WindowKind::Cumulate { step_ms, .. } => step_ms,
            WindowKind::Global => i64::MAX,
        }
    }

    /// Longest window on the local clock, ms (`i64::MAX` for global).
    pub fn span_ms(&self) -> i64 {
        match self.kind {
            WindowKind::Tumbling { size_ms } | WindowKind::Hopping { size_ms, .. } => size_ms,
            WindowKind::Cumulate { max_ms, .. } => max_ms,
            WindowKind::Global => i64::MAX,
        }
    }

    /// An upper bound of a window's length in real time, ms: a daylight-saving change may
    /// lengthen a window by its shift.
    pub fn reach_ms(&self) -> i64 {
        match self.zone {
            Zone::Utc => self.span_ms(),
            Zone::Named(_) => self.span_ms().saturating_add(2 * MAX_OFFSET_MS),
        }
    }

    fn window(&self, start: i64, end: i64) -> Window {
        Window { start: self.zone.instant(start), end: self.zone.instant(end) }
    }

    /// Start of the slice holding event time `t`.
    pub fn slice_start(&self, t: i64) -> i64 {
        match self.kind {
            WindowKind::Global => GLOBAL.start,
            _ => self.zone.instant(floor(self.zone.local(t), self.slice_ms())),
        }
    }

    /// End of the slice starting at `slice_start`.
    pub fn slice_end(&self, slice_start: i64) -> i64 {
        match self.kind {
            WindowKind::Global => GLOBAL.end,
            _ => self.zone.instant(floor(self.zone.local(slice_start), self.slice_ms()).saturating_add(self.slice_ms())),
        }
    }

    /// Every window containing event time `t`, earliest end first.
    pub fn windows_containing(&self, t: i64) -> Vec<Window> {
        let l = self.zone.local(t);
        match self.kind {
            WindowKind::Tumbling { size_ms } => {
                let start = floor(l, size_ms);
                vec![self.window(start, start + size_ms)]
            }
            WindowKind::Hopping { size_ms, slide_ms } => {
                let last = floor(l, slide_ms);
                let mut start = last - (size_ms - 1) / slide_ms * slide_ms;
                let mut out = Vec::new();
                while start <= last {
                    if start + size_ms > l {
                        out.push(self.window(start, start + size_ms));
                    }
                    start += slide_ms;
                }
                out
            }
            WindowKind::Cumulate { step_ms, max_ms } => {
                let start = floor(l, max_ms);
                let first_end = floor(l, step_ms) + step_ms;
                (first_end..=start + max_ms).step_by(step_ms as usize).map(|end| self.window(start, end)).collect()
            }
            WindowKind::Global => vec![GLOBAL],
        }
    }

    /// Where a record at event time `t` goes, given the watermark before it: the start of
    /// its slice, and which windows holding it it counts for — those whose end + `grace_ms`
    /// is after `watermark`. Windows holding one time close in the order of their ends, so
    /// that is every window ending at or after some instant. (One call, so the zone's clock
    /// is read once per record.)
    pub fn place(&self, t: i64, watermark: i64, grace_ms: i64) -> (i64, Admit) {
        let open = |end: i64| end.saturating_add(grace_ms) > watermark;
        let l = self.zone.local(t);
        let (first_end, last_end) = match self.kind {
            WindowKind::Global => return (GLOBAL.start, Admit::All),
            WindowKind::Tumbling { size_ms } => {
                let end = self.zone.instant(floor(l, size_ms) + size_ms);
                (end, end)
            }
            WindowKind::Hopping { size_ms, slide_ms } => {
                let last_start = floor(l, slide_ms);
                let first_start = last_start - (size_ms - 1) / slide_ms * slide_ms;
                let first_start = if first_start + size_ms > l { first_start } else { first_start + slide_ms };
                (self.zone.instant(first_start + size_ms), self.zone.instant(last_start + size_ms))
            }
            WindowKind::Cumulate { step_ms, max_ms } => {
                (self.zone.instant(floor(l, step_ms) + step_ms), self.zone.instant(floor(l, max_ms) + max_ms))
            }
        };
        let slice = self.zone.instant(floor(l, self.slice_ms()));
        let admit = if open(first_end) {
            Admit::All
        } else if !open(last_end) {
            Admit::Late
        } else {
            // The first window still open; windows holding `t` are few (size / slide at most).
            let first_open = self.windows_containing(t).into_iter().map(|w| w.end).find(|&e| open(e));
            first_open.map_or(Admit::Late, Admit::From)
        };
        (slice, admit)
    }

    /// The windows that hold data from slices starting in `slice_starts` (sorted or not),
    /// sorted by start then end. For cumulate, the steps of a span up to the step holding
    /// `latest` (the latest event time seen) or ending by `closed_by` (those closed), if
    /// later: further steps, still open, would only repeat the running total.
    pub fn windows_of_slices(&self, slice_starts: &[i64], latest: i64, closed_by: i64) -> Vec<Window> {
        let mut out: Vec<Window> = match self.kind {
            WindowKind::Cumulate { step_ms, max_ms } => {
                let newest_step_end = floor(self.zone.local(latest), step_ms).saturating_add(step_ms);
                let mut spans: Vec<i64> = slice_starts.iter().map(|&s| floor(self.zone.local(s), max_ms)).collect();
                spans.sort_unstable();
                spans.dedup();
                let mut out = Vec::new();
                for start in spans {
                    let mut end = start + step_ms;
                    while end <= start + max_ms {
                        let w = self.window(start, end);
                        if end > newest_step_end && w.end > closed_by {
                            break;
                        }
                        out.push(w);
                        end += step_ms;
                    }
                }
                out
            }
            _ => slice_starts.iter().flat_map(|&s| self.windows_containing(s)).collect(),
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Slices starting before this can be deleted: every window holding them has ended
    /// `retention_ms` or more before `watermark`. `None` for the global window, which never
    /// ends. A window of a cumulative span goes with the whole span, once its longest
    /// window has ended, so no running total shrinks step by step.
    pub fn expired_before(&self, watermark: i64, retention_ms: i64) -> Option<i64> {
        let (last_len, last_step) = match self.kind {
            WindowKind::Global => return None,
            WindowKind::Tumbling { size_ms } => (size_ms, size_ms),
            WindowKind::Hopping { size_ms, slide_ms } => (size_ms, slide_ms),
            WindowKind::Cumulate { max_ms, .. } => (max_ms, max_ms),
        };
        // The latest local time whose first instant has ended `retention_ms` ago.
        let ended = self.zone.local(watermark.saturating_sub(retention_ms));
        Some(self.zone.instant(floor(ended.saturating_sub(last_len), last_step).saturating_add(last_step)))
    }

    /// Whether window `w` is past its retention at `watermark` — its end (a cumulative
    /// window's: its span's) + `retention_ms` is at or before it — so some slice of it may
    /// have been deleted: it is no longer answered rather than answered short. (By the end,
    /// not the start: two windows starting in one skipped hour start at the same instant.)
    pub fn expired(&self, w: Window, watermark: i64, retention_ms: i64) -> bool {
        let end = match self.kind {
            WindowKind::Global => return false,
            WindowKind::Cumulate { max_ms, .. } => self.zone.instant(floor(self.zone.local(w.start), max_ms).saturating_add(max_ms)),
            _ => w.end,
        };
        end.saturating_add(retention_ms) <= watermark
    }
}

/// The longest window length accepted, ms (about 3,170 years): with event times within
/// ±[`MAX_TIME_MS`](crate::event::time::MAX_TIME_MS), every boundary stays inside the dates
/// the zone rules know and no computation overflows.
pub const MAX_LENGTH_MS: i64 = 100_000_000_000_000;

/// The most windows one record may fall in (hopping `size / slide`, cumulative
/// `max / step`): each is listed, answered and checked for lateness.
pub const MAX_WINDOWS_PER_RECORD: i64 = 100_000;

fn at_most_windows(what: &str, long: i64, short: i64) -> Result<(), String> {
    if long / short > MAX_WINDOWS_PER_RECORD {
        return Err(format!("{what} holds {} windows per record; at most {MAX_WINDOWS_PER_RECORD}", long / short));
    }
    Ok(())
}

fn positive(what: &str, ms: i64) -> Result<(), String> {
    if ms <= 0 {
        return Err(format!("{what} must be positive"));
    }
    if ms > MAX_LENGTH_MS {
        return Err(format!("{what} ({ms} ms) is longer than the {MAX_LENGTH_MS} ms a window may be"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;
    const DAY: i64 = 24 * HOUR;

    fn zone(name: &str) -> Zone {
        Zone::Named(name.parse().unwrap())
    }

    #[test]
    fn tumbling_boundaries() {
        let w = WindowSpec::tumbling(MIN, Zone::Utc).unwrap();
        assert_eq!(w.windows_containing(0), vec![Window { start: 0, end: MIN }]);
        assert_eq!(w.windows_containing(MIN - 1), vec![Window { start: 0, end: MIN }]);
        assert_eq!(w.windows_containing(MIN), vec![Window { start: MIN, end: 2 * MIN }]);
        assert_eq!(w.windows_containing(-1), vec![Window { start: -MIN, end: 0 }], "before the epoch");
        assert_eq!(w.slice_start(MIN + 5), MIN);
    }

    #[test]
    fn day_windows_align_to_local_midnight() {
        let w = WindowSpec::tumbling(DAY, zone("Asia/Shanghai")).unwrap();
        // 2021-09-06 00:30 in Shanghai is 2021-09-05 16:30 UTC.
        let got = w.windows_containing(1_630_859_400_000)[0];
        assert_eq!(got.start, 1_630_857_600_000, "2021-09-06 00:00 +08:00");
        assert_eq!(got.end - got.start, DAY);
    }

    #[test]
    fn days_across_daylight_saving_changes_are_23_and_25_hours() {
        let ny = WindowSpec::tumbling(DAY, zone("America/New_York")).unwrap();
        // 2021-03-14 12:00 EDT and 2021-11-07 12:00 EST.
        let spring = ny.windows_containing(1_615_737_600_000)[0];
        assert_eq!((spring.start, spring.end - spring.start), (1_615_698_000_000, 23 * HOUR), "from 00:00 EST");
        let fall = ny.windows_containing(1_636_304_400_000)[0];
        assert_eq!((fall.start, fall.end - fall.start), (1_636_257_600_000, 25 * HOUR), "from 00:00 EDT");
        // Hours: the repeated 01:00–02:00 is one two-hour window; the skipped 02:00 is empty.
        let hours = WindowSpec::tumbling(HOUR, zone("America/New_York")).unwrap();
        let at_0130_edt = 1_636_263_000_000;
        let at_0130_est = at_0130_edt + HOUR;
        let w = hours.windows_containing(at_0130_est)[0];
        assert_eq!(w, hours.windows_containing(at_0130_edt)[0]);
        assert_eq!(w.end - w.start, 2 * HOUR);
        // Casey's clock goes back three hours at 16:00 UTC: those three repeated hours belong
        // to the window before the next boundary, which holds every instant of them.
        let casey = WindowSpec::tumbling(30 * MIN, zone("Antarctica/Casey")).unwrap();
        for t in [1_678_291_200_000, 1_678_291_200_000 + 15 * MIN, 1_678_291_200_000 + 170 * MIN] {
            let w = casey.windows_containing(t)[0];
            assert!(w.start <= t && t < w.end, "{w:?} does not hold {t}");
        }
        let skipped = hours.windows_containing(1_615_705_200_000)[0]; // 03:00 EDT
        assert_eq!(skipped.start, 1_615_705_200_000, "the 02:00 window has no instant; 03:00 starts here");
        // Europe/Berlin changes at 01:00 UTC.
        let berlin = WindowSpec::tumbling(DAY, zone("Europe/Berlin")).unwrap();
        let oct31 = berlin.windows_containing(1_635_681_600_000)[0]; // 2021-10-31 12:00 UTC
        assert_eq!((oct31.start, oct31.end - oct31.start), (1_635_631_200_000, 25 * HOUR));
    }

    #[test]
    fn slices_tile_real_time_in_every_zone() {
        // Around New York's 2021-11-07 change; Antarctica/Casey's clock goes back three hours
        // on 2023-03-08 at 16:00 UTC.
        let around = [
            (Zone::Utc, 1_636_200_000_000),
            (zone("America/New_York"), 1_636_200_000_000),
            (zone("Australia/Lord_Howe"), 1_636_200_000_000),
            (zone("Asia/Kolkata"), 1_636_200_000_000),
            (zone("Antarctica/Casey"), 1_678_280_000_000),
        ];
        for (z, from) in around {
            let w = WindowSpec::hopping(HOUR, 20 * MIN, z).unwrap();
            let mut t = from;
            let mut s = w.slice_start(t);
            for _ in 0..500 {
                assert_eq!(w.place(t, i64::MIN, 0).0, s, "{z:?}: place and slice_start agree at {t}");
                let end = w.slice_end(s);
                assert!(s <= t && t < end, "{z:?}: {t} not in [{s}, {end})");
                for win in w.windows_containing(t) {
                    assert!(win.start <= s && end <= win.end, "{z:?}: {win:?} and slice {s}");
                }
                t = end + 1_234;
                s = w.slice_start(t);
                assert!(s >= end, "slices do not overlap");
            }
        }
    }

    #[test]
    fn hopping_overlaps_and_slices() {
        let w = WindowSpec::hopping(10 * MIN, 5 * MIN, Zone::Utc).unwrap();
        assert_eq!(w.slice_ms(), 5 * MIN);
        assert_eq!(w.windows_containing(5 * MIN), vec![Window { start: 0, end: 10 * MIN }, Window { start: 5 * MIN, end: 15 * MIN }]);
        let odd = WindowSpec::hopping(10 * MIN, 4 * MIN, Zone::Utc).unwrap();
        assert_eq!(odd.slice_ms(), 2 * MIN);
        // 9:59 is in [0,10) and [4,14) and [8,18).
        assert_eq!(odd.windows_containing(10 * MIN - 1).len(), 3);
        assert_eq!(odd.windows_containing(10 * MIN).len(), 2);
        assert!(WindowSpec::hopping(MIN, 2 * MIN, Zone::Utc).is_err());
        assert!(WindowSpec::hopping(DAY, 1, Zone::Utc).is_err(), "86,400,000 windows per record");
        assert!(WindowSpec::cumulate(1_000, DAY, Zone::Utc).is_ok(), "86,400 steps");
    }

    #[test]
    fn a_record_counts_for_the_windows_still_open() {
        let w = WindowSpec::hopping(10 * MIN, 5 * MIN, Zone::Utc).unwrap();
        assert_eq!(w.place(7 * MIN, 9 * MIN, 0).1, Admit::All);
        assert_eq!(w.place(7 * MIN, 10 * MIN, 0).1, Admit::From(15 * MIN), "[0, 10m) closed, [5m, 15m) open");
        assert_eq!(w.place(7 * MIN, 15 * MIN, 0).1, Admit::Late);
        assert_eq!(w.place(7 * MIN, 15 * MIN, 1).1, Admit::From(15 * MIN), "grace keeps it open");
        let c = WindowSpec::cumulate(MIN, 10 * MIN, Zone::Utc).unwrap();
        assert_eq!(c.place(2 * MIN + 1, 4 * MIN, 0).1, Admit::From(5 * MIN));
        assert_eq!(c.place(2 * MIN + 1, 10 * MIN, 0).1, Admit::Late);
        assert_eq!(WindowSpec::global().place(0, i64::MAX, 0).1, Admit::All);
        let t = WindowSpec::tumbling(MIN, Zone::Utc).unwrap();
        assert_eq!((t.place(1, MIN - 1, 0).1, t.place(1, MIN, 0).1), (Admit::All, Admit::Late));
    }

    #[test]
    fn cumulative_steps() {
        let w = WindowSpec::cumulate(MIN, 5 * MIN, Zone::Utc).unwrap();
        let got = w.windows_containing(2 * MIN + 1);
        assert_eq!(got.iter().map(|w| w.end / MIN).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(got.iter().all(|w| w.start == 0));
        assert_eq!(w.windows_containing(5 * MIN)[0], Window { start: 5 * MIN, end: 6 * MIN });
        // Windows of a span run to its end, or to the step of the latest event if sooner.
        let listed = w.windows_of_slices(&[0, 2 * MIN, 6 * MIN], 6 * MIN + 1, i64::MIN);
        let ends: Vec<i64> = listed.iter().map(|w| w.end / MIN).collect();
        assert_eq!(ends, vec![1, 2, 3, 4, 5, 6, 7]);
        let closed = w.windows_of_slices(&[6 * MIN], 6 * MIN + 1, 9 * MIN);
        assert_eq!(closed.iter().map(|w| w.end / MIN).collect::<Vec<_>>(), vec![6, 7, 8, 9], "and the closed ones");
        assert!(WindowSpec::cumulate(7 * MIN, 60 * MIN, Zone::Utc).is_err());
        // A span expires whole, once its last window has ended `retention` ago.
        assert_eq!(w.expired_before(5 * MIN - 1, 0), Some(0));
        assert_eq!(w.expired_before(5 * MIN, 0), Some(5 * MIN));
        assert_eq!(w.expired_before(6 * MIN, MIN), Some(5 * MIN));
    }

    #[test]
    fn windows_expire_when_end_plus_retention_reaches_the_watermark() {
        let w = WindowSpec::hopping(10 * MIN, 5 * MIN, Zone::Utc).unwrap();
        let win = Window { start: 0, end: 10 * MIN };
        assert!(!w.expired(win, 12 * MIN - 1, 2 * MIN));
        assert!(w.expired(win, 12 * MIN, 2 * MIN));
        assert!(!w.expired(Window { start: 5 * MIN, end: 15 * MIN }, 12 * MIN, 2 * MIN));
        // Slice [0, 5m) is only in [0, 10m) and [-5m, 5m): deletable; [5m, 10m) is not.
        assert_eq!(w.expired_before(12 * MIN, 2 * MIN), Some(5 * MIN));
    }

    #[test]
    fn global_is_one_slice() {
        let g = WindowSpec::global();
        assert_eq!(g.slice_start(-5), GLOBAL.start);
        assert_eq!(g.slice_start(i64::MAX / 2), GLOBAL.start);
        assert_eq!(g.slice_end(0), i64::MAX);
    }
}
