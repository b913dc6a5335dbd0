//! Windows, stored as slices.
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
//! Lateness follows the slices too (as in Flink): a record is late when the slice it falls
//! in has closed, i.e. `slice end + grace <= watermark`. Because a window's last slice ends
//! where the window ends, a window whose end + grace has passed never changes again.
//!
//! ```
//! use tally::window::{Window, WindowSpec};
//! let hop = WindowSpec::hopping(10 * 60_000, 5 * 60_000, 0).unwrap();
//! let t = 7 * 60_000; // 00:07
//! assert_eq!(hop.slice_start(t), 5 * 60_000);
//! assert_eq!(hop.windows_containing(t), vec![Window { start: 0, end: 600_000 }, Window { start: 300_000, end: 900_000 }]);
//! ```

use serde::Serialize;

/// Where windows begin and how long they are.
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

/// A window kind plus its alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WindowSpec {
    /// The kind and its sizes.
    #[serde(flatten)]
    pub kind: WindowKind,
    /// Offset of local time from UTC, ms: windows align to local midnights.
    pub offset_ms: i64,
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

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl WindowSpec {
    /// A tumbling window of `size_ms`.
    pub fn tumbling(size_ms: i64, offset_ms: i64) -> Result<Self, String> {
        positive("size", size_ms)?;
        Ok(WindowSpec { kind: WindowKind::Tumbling { size_ms }, offset_ms })
    }

    /// A hopping window; `slide_ms` must not exceed `size_ms`.
    pub fn hopping(size_ms: i64, slide_ms: i64, offset_ms: i64) -> Result<Self, String> {
        positive("size", size_ms)?;
        positive("slide", slide_ms)?;
        if slide_ms > size_ms {
            return Err(format!("slide ({slide_ms} ms) must not exceed size ({size_ms} ms); gaps between windows would drop records"));
        }
        Ok(WindowSpec { kind: WindowKind::Hopping { size_ms, slide_ms }, offset_ms })
    }

    /// A cumulative window; `max_ms` must be a whole number of steps.
    pub fn cumulate(step_ms: i64, max_ms: i64, offset_ms: i64) -> Result<Self, String> {
        positive("step", step_ms)?;
        positive("max", max_ms)?;
        if max_ms % step_ms != 0 {
            return Err(format!("max ({max_ms} ms) must be a whole multiple of step ({step_ms} ms)"));
        }
        Ok(WindowSpec { kind: WindowKind::Cumulate { step_ms, max_ms }, offset_ms })
    }

    /// The all-time window.
    pub fn global() -> Self {
        WindowSpec { kind: WindowKind::Global, offset_ms: 0 }
    }

    /// Length of a slice, ms (`i64::MAX` for global).
    pub fn slice_ms(&self) -> i64 {
        match self.kind {
            WindowKind::Tumbling { size_ms } => size_ms,
            WindowKind::Hopping { size_ms, slide_ms } => gcd(size_ms, slide_ms),
            WindowKind::Cumulate { step_ms, .. } => step_ms,
            WindowKind::Global => i64::MAX,
        }
    }

    /// Longest window, ms: how far back a slice can still be part of an open window.
    pub fn span_ms(&self) -> i64 {
        match self.kind {
            WindowKind::Tumbling { size_ms } | WindowKind::Hopping { size_ms, .. } => size_ms,
            WindowKind::Cumulate { max_ms, .. } => max_ms,
            WindowKind::Global => i64::MAX,
        }
    }

    fn align(&self, t: i64, len: i64) -> i64 {
        (t + self.offset_ms).div_euclid(len) * len - self.offset_ms
    }

    /// Start of the slice holding event time `t`.
    pub fn slice_start(&self, t: i64) -> i64 {
        match self.kind {
            WindowKind::Global => GLOBAL.start,
            _ => self.align(t, self.slice_ms()),
        }
    }

    /// End of the slice starting at `slice_start`.
    pub fn slice_end(&self, slice_start: i64) -> i64 {
        match self.kind {
            WindowKind::Global => GLOBAL.end,
            _ => slice_start.saturating_add(self.slice_ms()),
        }
    }

    /// Every window containing event time `t`, earliest start first.
    pub fn windows_containing(&self, t: i64) -> Vec<Window> {
        match self.kind {
            WindowKind::Tumbling { size_ms } => {
                let start = self.align(t, size_ms);
                vec![Window { start, end: start + size_ms }]
            }
            WindowKind::Hopping { size_ms, slide_ms } => {
                let last = self.align(t, slide_ms);
                let mut out = Vec::new();
                let mut start = last - (size_ms - 1) / slide_ms * slide_ms;
                while start <= last {
                    if start + size_ms > t {
                        out.push(Window { start, end: start + size_ms });
                    }
                    start += slide_ms;
                }
                out
            }
            WindowKind::Cumulate { step_ms, max_ms } => {
                let start = self.align(t, max_ms);
                let first_end = self.align(t, step_ms) + step_ms;
                (first_end..=start + max_ms).step_by(step_ms as usize).map(|end| Window { start, end }).collect()
            }
            WindowKind::Global => vec![GLOBAL],
        }
    }

    /// The windows that hold data from slices starting in `slice_starts` (sorted or not),
    /// sorted by start then end. For cumulate, only windows ending at a slice that has data
    /// (no copies of the latest total for every future step).
    pub fn windows_of_slices(&self, slice_starts: &[i64]) -> Vec<Window> {
        let mut out: Vec<Window> = match self.kind {
            WindowKind::Cumulate { max_ms, .. } => {
                let mut spans: Vec<(i64, i64)> = slice_starts.iter().map(|&s| (self.align(s, max_ms), s)).collect();
                spans.sort_unstable();
                // Every step from the span's start up to its latest slice with data.
                let mut out = Vec::new();
                let mut i = 0;
                while i < spans.len() {
                    let start = spans[i].0;
                    let mut last = spans[i].1;
                    while i < spans.len() && spans[i].0 == start {
                        last = last.max(spans[i].1);
                        i += 1;
                    }
                    let step = self.slice_ms();
                    let mut end = start + step;
                    while end <= last + step {
                        out.push(Window { start, end });
                        end += step;
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

    /// Slices starting before this can be deleted: every window holding them ended more
    /// than `retention_ms` before `watermark`. `None` for the global window, which never ends.
    pub fn expired_before(&self, watermark: i64, retention_ms: i64) -> Option<i64> {
        let ended_before = watermark.saturating_sub(retention_ms);
        match self.kind {
            WindowKind::Global => None,
            // Every window of a span grows from its start: the span goes whole, once its
            // longest window has ended, so no running total shrinks step by step.
            WindowKind::Cumulate { max_ms, .. } => Some(self.align(ended_before.saturating_sub(max_ms), max_ms).saturating_add(max_ms)),
            _ => Some(ended_before.saturating_sub(self.span_ms())),
        }
    }
}

fn positive(what: &str, ms: i64) -> Result<(), String> {
    if ms <= 0 {
        return Err(format!("{what} must be positive"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;

    #[test]
    fn tumbling_boundaries() {
        let w = WindowSpec::tumbling(MIN, 0).unwrap();
        assert_eq!(w.windows_containing(0), vec![Window { start: 0, end: MIN }]);
        assert_eq!(w.windows_containing(MIN - 1), vec![Window { start: 0, end: MIN }]);
        assert_eq!(w.windows_containing(MIN), vec![Window { start: MIN, end: 2 * MIN }]);
        assert_eq!(w.windows_containing(-1), vec![Window { start: -MIN, end: 0 }], "before the epoch");
        assert_eq!(w.slice_start(MIN + 5), MIN);
    }

    #[test]
    fn day_windows_align_to_local_midnight() {
        let day = 24 * HOUR;
        let w = WindowSpec::tumbling(day, 8 * HOUR).unwrap();
        // 2021-09-06 00:30 in Shanghai is 2021-09-05 16:30 UTC.
        let t = 1_630_859_400_000;
        let got = w.windows_containing(t)[0];
        assert_eq!(got.start, 1_630_857_600_000, "2021-09-06 00:00 +08:00");
        assert_eq!(got.end - got.start, day);
    }

    #[test]
    fn hopping_overlaps_and_slices() {
        let w = WindowSpec::hopping(10 * MIN, 5 * MIN, 0).unwrap();
        assert_eq!(w.slice_ms(), 5 * MIN);
        assert_eq!(w.windows_containing(5 * MIN), vec![Window { start: 0, end: 10 * MIN }, Window { start: 5 * MIN, end: 15 * MIN }]);
        let odd = WindowSpec::hopping(10 * MIN, 4 * MIN, 0).unwrap();
        assert_eq!(odd.slice_ms(), 2 * MIN);
        // 9:59 is in [0,10) and [4,14) and [8,18).
        assert_eq!(odd.windows_containing(10 * MIN - 1).len(), 3);
        assert_eq!(odd.windows_containing(10 * MIN).len(), 2);
        // Every window containing t holds t's whole slice.
        for t in (0..40 * MIN).step_by(17_321) {
            let s = odd.slice_start(t);
            for win in odd.windows_containing(t) {
                assert!(win.start <= s && odd.slice_end(s) <= win.end, "{win:?} and slice {s}");
            }
        }
        assert!(WindowSpec::hopping(MIN, 2 * MIN, 0).is_err());
    }

    #[test]
    fn cumulative_steps() {
        let w = WindowSpec::cumulate(MIN, 5 * MIN, 0).unwrap();
        let got = w.windows_containing(2 * MIN + 1);
        assert_eq!(got.iter().map(|w| w.end / MIN).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(got.iter().all(|w| w.start == 0));
        assert_eq!(w.windows_containing(5 * MIN)[0], Window { start: 5 * MIN, end: 6 * MIN });
        // Windows from data stop at the latest slice holding data.
        let listed = w.windows_of_slices(&[0, 2 * MIN, 6 * MIN]);
        let ends: Vec<i64> = listed.iter().map(|w| w.end / MIN).collect();
        assert_eq!(ends, vec![1, 2, 3, 6, 7]);
        assert!(WindowSpec::cumulate(7 * MIN, 60 * MIN, 0).is_err());
        // A span expires whole, once its last window has ended `retention` ago.
        assert_eq!(w.expired_before(5 * MIN - 1, 0), Some(0));
        assert_eq!(w.expired_before(5 * MIN, 0), Some(5 * MIN));
        assert_eq!(w.expired_before(6 * MIN, MIN), Some(5 * MIN));
    }

    #[test]
    fn global_is_one_slice() {
        let g = WindowSpec::global();
        assert_eq!(g.slice_start(-5), GLOBAL.start);
        assert_eq!(g.slice_start(i64::MAX / 2), GLOBAL.start);
        assert_eq!(g.slice_end(0), i64::MAX);
    }
}
