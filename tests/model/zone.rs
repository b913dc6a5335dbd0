//! Windows from their definition: boundaries are whole multiples of the window's lengths on
//! the zone's local clock (from local 1970-01-01 00:00); a boundary is the first instant the
//! clock shows it (the instant it jumps past it, if it falls in a skipped hour); a window is
//! the real-time interval between two boundaries. Computed here by trying instants, not by
//! any formula of tally's.

use chrono::{DateTime, LocalResult, Offset, TimeZone};
use chrono_tz::Tz;

use super::spec::WindowSpec;

/// The local clock's reading at instant `t`.
fn wall(tz: Option<Tz>, t: i64) -> i64 {
    match tz {
        None => t,
        Some(z) => t + z.offset_from_utc_datetime(&DateTime::from_timestamp_millis(t).unwrap().naive_utc()).fix().local_minus_utc() as i64 * 1000,
    }
}

/// The first instant at which the local clock shows `local` or later.
pub fn first_instant(tz: Option<Tz>, local: i64) -> i64 {
    let Some(z) = tz else { return local };
    let mut l = local;
    loop {
        let naive = DateTime::from_timestamp_millis(l).unwrap().naive_utc();
        match z.from_local_datetime(&naive) {
            LocalResult::Single(t) => return t.timestamp_millis(),
            LocalResult::Ambiguous(a, b) => return a.timestamp_millis().min(b.timestamp_millis()),
            // A skipped time: the first one the clock does show after it is where it jumped to.
            LocalResult::None => l = (l / 60_000 + 1) * 60_000,
        }
    }
}

/// Cell `k` of the grid of `len` local ms, as a real-time interval.
pub fn cell(tz: Option<Tz>, k: i64, len: i64) -> (i64, i64) {
    (first_instant(tz, k * len), first_instant(tz, (k + 1) * len))
}

/// The cell of the grid of `len` holding instant `t`.
pub fn cell_of(tz: Option<Tz>, t: i64, len: i64) -> i64 {
    let mut k = wall(tz, t).div_euclid(len);
    while cell(tz, k, len).1 <= t {
        k += 1;
    }
    while cell(tz, k, len).0 > t {
        k -= 1;
    }
    k
}

/// The global window.
pub const GLOBAL: (i64, i64) = (0, i64::MAX);

/// Every window holding instant `t`, as (start, end).
pub fn windows_containing(w: WindowSpec, tz: Option<Tz>, t: i64) -> Vec<(i64, i64)> {
    match w {
        WindowSpec::Global => vec![GLOBAL],
        WindowSpec::Tumbling { size } => vec![cell(tz, cell_of(tz, t, size), size)],
        WindowSpec::Hopping { size, slide } => {
            let k = cell_of(tz, t, slide);
            let back = size / slide + 2;
            (k - back..=k + 1)
                .map(|j| (first_instant(tz, j * slide), first_instant(tz, j * slide + size)))
                .filter(|(s, e)| *s <= t && t < *e)
                .collect()
        }
        WindowSpec::Cumulate { step, max } => {
            let a = cell_of(tz, t, max);
            (1..=max / step).map(|i| (first_instant(tz, a * max), first_instant(tz, a * max + i * step))).filter(|(s, e)| *s <= t && t < *e).collect()
        }
    }
}

/// The longest window of the span or window `(start, end)` belongs to ends here: itself,
/// except for a cumulative window, whose span ends at its last step.
pub fn span_end(w: WindowSpec, tz: Option<Tz>, window: (i64, i64)) -> i64 {
    match w {
        WindowSpec::Cumulate { max, .. } => cell(tz, cell_of(tz, window.0, max), max).1,
        _ => window.1,
    }
}

/// Length of the slices the metric stores, local ms.
fn slice_len(w: WindowSpec) -> Option<i64> {
    fn gcd(a: i64, b: i64) -> i64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    match w {
        WindowSpec::Tumbling { size } => Some(size),
        WindowSpec::Hopping { size, slide } => Some(gcd(size, slide)),
        WindowSpec::Cumulate { step, .. } => Some(step),
        WindowSpec::Global => None,
    }
}

/// The slice holding instant `t`.
pub fn slice_of(w: WindowSpec, tz: Option<Tz>, t: i64) -> (i64, i64) {
    match slice_len(w) {
        None => GLOBAL,
        Some(len) => cell(tz, cell_of(tz, t, len), len),
    }
}
