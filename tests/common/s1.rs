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

/// Rows of a windowed count answer as (window start, key text) → count of `agg`.
pub fn counts_of(answer: &serde_json::Value, agg: &str) -> BTreeMap<(i64, String), u64> {
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let key = r["key"].as_object().unwrap().values().map(text).collect::<Vec<_>>().join("|");
            ((r["window"]["start"].as_i64().unwrap(), key), r["values"][agg].as_u64().unwrap())
        })
        .collect()
}

/// Asserts that tally at `addr` answers S1 over `records` exactly: every count equal, every
/// sketch byte-identical to a clean pass. `label` says after what (printed with the totals).
pub fn assert_exact(addr: std::net::SocketAddr, records: &[GenRecord], label: &str) {
    let want = truth(records);
    let pv = counts_of(&super::get(addr, "/api/v1/metrics/pv_by_product"), "pv");
    let views = counts_of(&super::get(addr, "/api/v1/metrics/views"), "views");
    let total = |m: &BTreeMap<(i64, String), u64>| m.values().sum::<u64>() as i64;
    println!(
        "{label}: pv overcount {} of {} (views {} of {})",
        total(&pv) - total(&want.pv),
        total(&want.pv),
        total(&views) - total(&want.views),
        total(&want.views)
    );
    assert_eq!(pv, want.pv, "pv_by_product {label}");
    assert_eq!(views, want.views, "views {label}");
    assert_eq!(counts_of(&super::get(addr, "/api/v1/metrics/purchases"), "purchases"), want.purchases, "purchases {label}");
    let all = super::get(addr, "/api/v1/metrics/uv_all_time?sketch=canonical");
    assert!(all["rows"][0]["values"]["uv"]["sketch"].as_str().unwrap() == super::sketch_hex(&want.uv_all, 14), "uv_all_time sketch {label} equals a clean pass");
    let uv = super::get(addr, "/api/v1/metrics/uv_10m?sketch=canonical");
    for r in uv["rows"].as_array().unwrap() {
        let w = r["window"]["start"].as_i64().unwrap();
        let users = &want.uv_10m[&(w, String::new())];
        assert!(r["values"]["uv"]["sketch"].as_str().unwrap() == super::sketch_hex(users, 14), "uv_10m sketch of window {w} {label}");
    }
    assert_eq!(uv["rows"].as_array().unwrap().len(), want.uv_10m.len(), "uv_10m windows {label}");
}
