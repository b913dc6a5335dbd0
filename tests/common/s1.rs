//! The exact S1 answers, recomputed from the event list.

use std::collections::BTreeMap;

use tally::gen::GenRecord;

use super::{floor, local_ms, replay, text, Distinct};

const MIN: i64 = 60_000;

/// Counts per (window start, key text).
pub type Counts = BTreeMap<(i64, String), u64>;

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

/// Checks S1's result-topic rows (`(key, value)` as read) against the recomputation over
/// `records`, with `frontier` the lowest partition watermark at the end:
/// - every final row, every copy of it (rows are sent again after crashes and moves), holds
///   the exact value — counts and ratios equal, UV the estimate of a clean-pass sketch;
/// - every window closed by `frontier` has its final row, and no open window has one;
/// - the last update of `uv_all_time` is the clean pass's estimate.
///
/// `Err` says what is wrong or missing; `Ok` sums up what was checked.
pub fn check_results(rows: &[(Vec<u8>, Vec<u8>)], records: &[GenRecord], frontier: i64) -> Result<String, String> {
    use serde_json::{json, Value};
    let want = truth(records);
    let counts: [(&str, &str, &Counts); 4] =
        [("pv_by_product", "pv", &want.pv), ("views", "views", &want.views), ("purchases", "purchases", &want.purchases), ("purchases_by_product", "purchases", &want.purchases_by_product)];
    let mut finals: BTreeMap<(String, i64, String), u64> = BTreeMap::new();
    let mut last_uv_all: Option<Value> = None;
    for (k, v) in rows {
        let key: Value = serde_json::from_slice(k).map_err(|e| format!("result key is not JSON: {e}"))?;
        let row: Value = serde_json::from_slice(v).map_err(|e| format!("result value is not JSON: {e}"))?;
        if key != json!({ "metric": row["metric"], "key": row["key"], "window": row["window"] }) {
            return Err(format!("key {key} does not name the row's metric, key and window: {row}"));
        }
        let metric = row["metric"].as_str().unwrap_or_default().to_string();
        if metric == "uv_all_time" {
            last_uv_all = Some(row);
            continue;
        }
        if row["final"] != json!(true) {
            return Err(format!("{metric} sends final rows only: {row}"));
        }
        let start = row["window"]["start"].as_i64().ok_or_else(|| format!("no window start: {row}"))?;
        if row["window"]["end"].as_i64() != Some(start + 10 * MIN) || start + 10 * MIN > frontier {
            return Err(format!("final row of a window not closed by the frontier {frontier}: {row}"));
        }
        let key_text = row["key"].as_object().map(|o| o.values().map(text).collect::<Vec<_>>().join("|")).unwrap_or_default();
        let at = (start, key_text.clone());
        let values = &row["values"];
        let ok = match metric.as_str() {
            "uv_10m" => want.uv_10m.get(&at).map(|users| super::sketch_estimate(users, 14)) == values["uv"]["estimate"].as_f64(),
            // serde_json parses floats to within an ulp (no `float_roundtrip`): the counts
            // behind a ratio are compared exactly, the ratio to 1e-12.
            "conversion_rate" | "conversion_rate_by_product" => {
                let (num, den) = if metric == "conversion_rate" { (&want.purchases, &want.views) } else { (&want.purchases_by_product, &want.pv) };
                let (n, d) = (num.get(&at).copied().unwrap_or(0), den.get(&at).copied().unwrap_or(0));
                d > 0 && values["numerator"].as_u64() == Some(n) && values["denominator"].as_u64() == Some(d) && values["ratio"].as_f64().is_some_and(|r| (r - n as f64 / d as f64).abs() < 1e-12)
            }
            _ => match counts.iter().find(|c| c.0 == metric) {
                Some((_, agg, map)) => map.get(&at).is_some_and(|n| values[*agg].as_u64() == Some(*n)),
                None => return Err(format!("a row of an unknown metric: {row}")),
            },
        };
        if !ok {
            return Err(format!("wrong final value for {metric} window {start} key `{key_text}`: {row}"));
        }
        *finals.entry((metric, start, key_text)).or_default() += 1;
    }
    let mut expected = 0;
    let ratio_keys: [(&str, &Counts); 2] = [("conversion_rate", &want.views), ("conversion_rate_by_product", &want.pv)];
    let uv_keys: Vec<(i64, String)> = want.uv_10m.keys().cloned().collect();
    for (metric, keys) in counts
        .iter()
        .map(|(m, _, map)| (*m, map.keys().collect::<Vec<_>>()))
        .chain(ratio_keys.iter().map(|(m, map)| (*m, map.keys().collect())))
        .chain([("uv_10m", uv_keys.iter().collect())])
    {
        for (start, key) in keys.into_iter().filter(|k| k.0 + 10 * MIN <= frontier) {
            expected += 1;
            if !finals.contains_key(&(metric.to_string(), *start, key.clone())) {
                return Err(format!("no final row for {metric} window {start} key `{key}` (closed by the frontier {frontier})"));
            }
        }
    }
    let uv_all = last_uv_all.ok_or("no update of uv_all_time")?;
    if uv_all["values"]["uv"]["estimate"].as_f64() != Some(super::sketch_estimate(&want.uv_all, 14)) {
        return Err(format!("last uv_all_time update {uv_all} is not the clean pass's estimate {}", super::sketch_estimate(&want.uv_all, 14)));
    }
    let copies: u64 = finals.values().sum();
    Ok(format!("{} result rows: {expected} final rows exact ({} sent again), uv_all_time's last update exact", rows.len(), copies - expected))
}
