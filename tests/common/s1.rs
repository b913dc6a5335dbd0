//! S1's answers and result rows checked against the reference model of the shipped config.

use tally::gen::GenRecord;

use crate::model::Model;

/// The model of `examples/s1-uvpv.toml` over `records` on `partitions` partitions. The
/// records' Kafka timestamps are the moment they were produced, after their (2021) event
/// times, so `max_ahead` never applies and the model does without them.
pub fn model(records: &[GenRecord], partitions: i32) -> Model {
    super::model_of("s1-uvpv.toml", partitions, records.iter().map(|r| (r.partition, None, r.payload.clone())))
}

/// Asserts that tally at `addr` answers S1 over `records` exactly: every window of every
/// metric and ratio as the model has it, counts equal, sketches byte-identical to one built
/// from the model's records. `label` says after what (printed with the totals).
pub fn assert_exact(addr: std::net::SocketAddr, records: &[GenRecord], label: &str) {
    let probe = super::get(addr, "/api/v1/metrics/views");
    let partitions = probe["coverage"]["partitions"].as_array().map_or(0, Vec::len) as i32;
    let model = model(records, partitions);
    let views: u64 = probe["rows"].as_array().unwrap().iter().map(|r| r["values"]["views"].as_u64().unwrap_or(0)).sum();
    let mi = model.spec.metrics.iter().position(|m| m.name == "views").unwrap();
    let want: u64 = model.rows(mi, Default::default(), None).values().map(|a| a[0].number().unwrap_or(0.0) as u64).sum();
    println!("{label}: views overcount {} of {want} (summed over windows)", views as i64 - want as i64);
    super::assert_no_diffs(&super::check_answers(addr, &model), label);
}

/// Checks S1's result-topic rows (`(key, value)` as read) against the model over
/// `records`: every final row — every copy of it, as rows are sent again after crashes and
/// moves — exact, every window closed by the model's lowest watermark sent, no open window
/// sent, the last update of `uv_all_time` exact, and every key naming its row.
///
/// `Err` says what is wrong or missing; `Ok` sums up what was checked.
pub fn check_results(rows: &[(Vec<u8>, Vec<u8>)], records: &[GenRecord], partitions: i32) -> Result<String, String> {
    use serde_json::{json, Value};
    let model = model(records, partitions);
    let mut values = Vec::new();
    for (k, v) in rows {
        let key: Value = serde_json::from_slice(k).map_err(|e| format!("result key is not JSON: {e}"))?;
        let row: Value = serde_json::from_slice(v).map_err(|e| format!("result value is not JSON: {e}"))?;
        if key != json!({ "metric": row["metric"], "key": row["key"], "window": row["window"] }) {
            return Err(format!("key {key} does not name the row's metric, key and window: {row}"));
        }
        values.push(row);
    }
    let diffs = model.check_result_rows(&values, &|_, _| false);
    if !diffs.is_empty() {
        return Err(format!("{} differences, first: {}", diffs.len(), diffs.iter().take(5).cloned().collect::<Vec<_>>().join("; ")));
    }
    let finals = values.iter().filter(|v| v["final"] == json!(true)).count();
    let distinct: std::collections::BTreeSet<String> =
        values.iter().filter(|v| v["final"] == json!(true)).map(|v| format!("{}{}{}", v["metric"], v["key"], v["window"])).collect();
    Ok(format!(
        "{} result rows: {} final rows exact ({} sent again), uv_all_time's last update exact",
        rows.len(),
        distinct.len(),
        finals - distinct.len()
    ))
}
