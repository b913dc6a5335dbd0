//! The exact S1 answers, recomputed from the event list.

use std::collections::BTreeMap;

use tally::gen::GenRecord;

use super::{floor, local_ms, replay, text, Distinct};

const MIN: i64 = 60_000;

/// S1's answers: per (window start, key) maps, as the API's rows are keyed.
#[derive(Debug, Default)]
pub struct S1 {
    pub uv_all: Distinct,
    pub uv_10m: BTreeMap<(i64, String), Distinct>,
    pub pv: BTreeMap<(i64, String), u64>,
    pub views: BTreeMap<(i64, String), u64>,
    pub purchases: BTreeMap<(i64, String), u64>,
    pub purchases_by_product: BTreeMap<(i64, String), u64>,
    /// Users of every record not late for `uv_10m`.
    pub span_users: Distinct,
    pub late: BTreeMap<&'static str, u64>,
    pub invalid: u64,
}

/// Replays S1's records: watermark = max event time - 10 min per partition; a record is
/// late for a metric when its 5-minute slice has closed; hopping 10/5-minute windows.
pub fn truth(records: &[GenRecord]) -> S1 {
    let evs = replay(records, |o| local_ms(o.get("create_time"), 8), 10 * MIN);
    let slice = 5 * MIN;
    let mut t1 = S1::default();
    for ev in &evs {
        let Some((o, t)) = &ev.event else {
            t1.invalid += 1;
            continue;
        };
        let user = text(&o["user_id"]);
        let product = text(&o["product_id"]);
        let kind = o["record_type"].as_i64();
        t1.uv_all.insert(user.clone());
        let s = floor(*t, slice, 0);
        let filtered: &[&'static str] = match kind {
            Some(0) => &["uv_10m", "pv_by_product", "views"],
            Some(1) => &["uv_10m", "purchases", "purchases_by_product"],
            _ => &["uv_10m"],
        };
        if s + slice <= ev.wm_before {
            for m in filtered {
                *t1.late.entry(m).or_default() += 1;
            }
            continue;
        }
        t1.span_users.insert(user.clone());
        for w in [s - slice, s] {
            t1.uv_10m.entry((w, String::new())).or_default().insert(user.clone());
            match kind {
                Some(0) => {
                    *t1.pv.entry((w, product.clone())).or_default() += 1;
                    *t1.views.entry((w, String::new())).or_default() += 1;
                }
                Some(1) => {
                    *t1.purchases.entry((w, String::new())).or_default() += 1;
                    *t1.purchases_by_product.entry((w, product.clone())).or_default() += 1;
                }
                _ => {}
            }
        }
    }
    t1
}
