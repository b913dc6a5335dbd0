//! Deterministic event generators for the workloads of `SCENARIOS.md`.
//!
//! Each scenario's events are drawn from one seeded PRNG, so the same [`GenOptions`] give
//! byte-identical records: a test generates a stream, feeds it to tally, and recomputes the
//! exact answers from the very same payloads. Record `i` is due at
//! `start_ms + i * step_ms`; a chosen share is moved back in time (out of order, or far enough
//! to be late) and a chosen share is malformed, so the awkward paths are exercised on purpose
//! rather than by luck.
//!
//! ```
//! use tally::gen::{generate, GenOptions, Scenario};
//! let opts = GenOptions { count: 100, ..GenOptions::for_scenario(Scenario::S5) };
//! let records = generate(Scenario::S5, &opts);
//! assert_eq!(records.len(), 100);
//! assert_eq!(records, generate(Scenario::S5, &opts));
//! ```

use chrono::{DateTime, Datelike, TimeZone};
use chrono_tz::{Asia::Shanghai, Tz};
use serde_json::Value;

const SECOND: i64 = 1_000;
const MINUTE: i64 = 60 * SECOND;
const DAY: i64 = 24 * 60 * MINUTE;

/// The timestamp layout of the scenarios whose times are local strings.
const TIME_FORMAT: &str = "%Y-%m-%d %H:%M:%S";

/// Which scenario's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Website UV / PV / conversion rate: topic `uvpv-demo`.
    S1,
    /// Game spend per app key and day: topic `game_consume_log`.
    S2a,
    /// Live streaming: viewers (`live_streaming_log`), gifts (`live_gift_total`) and the
    /// room → module table (`live_room_module`, a compacted topic).
    S3,
    /// Shop PV/UV as a running daily total: topic `pv-uv`.
    S2b,
    /// Taobao user behaviour, event time from `month`/`day`: topic `user-behavior`.
    S4,
    /// Hot products from clicks with epoch-millisecond times: topic `user-clicks`.
    S5,
}

/// What kind of record a generated record is meant to be (tests use it for reporting only; the
/// truth is always recomputed from the payloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Event time exactly when the record is due.
    InOrder,
    /// Event time moved back by at most `ooo_max_ms`: meant to be still within the watermark.
    OutOfOrder,
    /// Event time moved back by `late_min_ms..=2*late_min_ms`: meant to be behind the watermark.
    Late,
    /// Malformed payload (not JSON, not an object, no usable event time, or a field of the
    /// wrong type).
    Bad,
}

/// One generated Kafka record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenRecord {
    /// Partition, chosen from the key as Kafka's Java default partitioner would.
    pub partition: i32,
    /// Record key (the scenario's natural key, e.g. the user id), UTF-8.
    pub key: Vec<u8>,
    /// Record value: the JSON event, or a malformed one for [`RecordKind::Bad`].
    pub payload: Vec<u8>,
    /// The topic, for a scenario with several ([`Scenario::S3`]); `None`: the scenario's one
    /// ([`topic`]).
    pub topic: Option<&'static str>,
    /// What the record is meant to be.
    pub kind: RecordKind,
}

/// Generator options.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// PRNG seed; the same options always give the same records.
    pub seed: u64,
    /// Number of records [`generate`] returns ([`live`] ignores it: it never ends).
    pub count: usize,
    /// Records are spread over partitions `0..partitions` by hashing the record key
    /// (values below 1 are taken as 1).
    pub partitions: i32,
    /// Event time of the first record, epoch ms (UTC).
    pub start_ms: i64,
    /// Event-time advance per record (e.g. 100 => 10 events per second of event time).
    pub step_ms: i64,
    /// Share of records whose event time is moved back by a random amount `1..=ooo_max_ms`.
    pub out_of_order_share: f64,
    /// Largest move back of an out-of-order record, ms.
    pub ooo_max_ms: i64,
    /// Share of records moved back by `late_min_ms..=2*late_min_ms` (meant to fall behind the
    /// watermark).
    pub late_share: f64,
    /// Smallest move back of a late record, ms.
    pub late_min_ms: i64,
    /// Share of malformed records.
    pub bad_share: f64,
    /// Number of distinct users (or accounts, roles); the scenario's other dimensions
    /// (products, servers, items…) are scaled from it.
    pub cardinality: u64,
}

impl GenOptions {
    /// Sensible defaults for `s`: 10 000 records over 3 partitions, 2 % out of order (within
    /// the watermark of the scenario's shipped config), 1 % late, 1 % bad, and a time span
    /// that covers several windows of that config.
    pub fn for_scenario(s: Scenario) -> GenOptions {
        let common = GenOptions {
            seed: 42,
            count: 10_000,
            partitions: 3,
            start_ms: 0,
            step_ms: 100,
            out_of_order_share: 0.02,
            ooo_max_ms: MINUTE,
            late_share: 0.01,
            late_min_ms: DAY,
            bad_share: 0.01,
            cardinality: 5_000,
        };
        match s {
            // 10 events/s for ~17 min: three 10-minute hopping windows sliding every 5
            // minutes; out of order stays under the 10-minute watermark, late is 40+ minutes
            // back so it misses every window it belongs to.
            Scenario::S1 => {
                GenOptions { start_ms: shanghai_ms(2021, 9, 6, 16), step_ms: 100, ooo_max_ms: 5 * MINUTE, late_min_ms: 40 * MINUTE, ..common }
            }
            // One event per 30 s for ~3.5 days, starting in the evening so the first local day
            // is a partial one; late is a day or more back so its whole day has closed.
            Scenario::S2a => GenOptions {
                start_ms: shanghai_ms(2020, 9, 29, 20),
                step_ms: 30 * SECOND,
                ooo_max_ms: 2 * MINUTE,
                late_min_ms: DAY,
                cardinality: 1_000,
                ..common
            },
            // One event per 2 s for ~5.5 hours across local midnight, so the cumulative day
            // window restarts mid-stream.
            Scenario::S2b => GenOptions {
                start_ms: shanghai_ms(2021, 12, 1, 22),
                step_ms: 2 * SECOND,
                ooo_max_ms: 30 * SECOND,
                late_min_ms: DAY,
                cardinality: 2_000,
                ..common
            },
            // Event times only have day resolution here, so 10 000 records span 20 days.
            // With a 5-minute watermark the previous day's window is still open when a new day
            // begins, so out of order is up to a day back; late is 3–6 days back.
            Scenario::S4 => {
                GenOptions { start_ms: shanghai_ms(2021, 11, 1, 0), step_ms: 20 * DAY / 10_000, ooo_max_ms: DAY, late_min_ms: 3 * DAY, ..common }
            }
            // One event per 3 s for ~8 hours of the seed's day, so the last 6 hours are a real
            // span; out of order within the 1-minute watermark, late is an hour or more back.
            Scenario::S3 => GenOptions {
                start_ms: shanghai_ms(2021, 8, 16, 8),
                step_ms: 3 * SECOND,
                ooo_max_ms: 50 * SECOND,
                late_min_ms: 60 * MINUTE,
                cardinality: 2_000,
                ..common
            },
            // The seed's own example time (2022-12-27 16:50:00 Asia/Shanghai); 2 events/s for
            // ~83 minutes so one full hour of top-N; out of order stays under the 5-second
            // watermark, late is 2+ minutes back, past the end of its 1-minute window.
            Scenario::S5 => GenOptions { start_ms: 1_672_131_000_000, step_ms: 500, ooo_max_ms: 4 * SECOND, late_min_ms: 2 * MINUTE, ..common },
        }
    }
}

/// Generates `opts.count` records of `scenario`.
///
/// # Panics
/// If an event time falls outside chrono's range (about ±262 000 years).
pub fn generate(scenario: Scenario, opts: &GenOptions) -> Vec<GenRecord> {
    live(scenario, opts).take(opts.count).collect()
}

/// The same stream as an endless iterator whose event times follow the wall clock (for the
/// demo): record `i` is due at `start_ms + i * step_ms`, computed exactly as in [`generate`]
/// (whose records are this iterator's first `count`). The iterator never sleeps: the caller
/// picks `start_ms = now` and sends record `i` when the clock reaches its due time.
///
/// # Panics
/// If an event time falls outside chrono's range (about ±262 000 years).
pub fn live(scenario: Scenario, opts: &GenOptions) -> impl Iterator<Item = GenRecord> {
    Stream { scenario, opts: opts.clone(), rng: Rng(opts.seed), index: 0 }
}

/// The topic name the scenario's shipped config reads.
pub fn topic(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::S1 => "uvpv-demo",
        Scenario::S2a => "game_consume_log",
        Scenario::S2b => "pv-uv",
        Scenario::S3 => S3_GIFTS,
        Scenario::S4 => "user-behavior",
        Scenario::S5 => "user-clicks",
    }
}

/// Every topic the scenario's records go to (S3: viewers, gifts, then the room table).
pub fn topics(scenario: Scenario) -> Vec<&'static str> {
    match scenario {
        Scenario::S3 => vec![S3_VIEWS, S3_GIFTS, S3_ROOMS],
        s => vec![topic(s)],
    }
}

/// S3's viewer events.
pub const S3_VIEWS: &str = "live_streaming_log";
/// S3's gift events.
pub const S3_GIFTS: &str = "live_gift_total";
/// S3's room → module table (compacted; key = room id).
pub const S3_ROOMS: &str = "live_room_module";

/// Epoch ms of a whole hour of Asia/Shanghai local time (the seeds' zone; it has no DST, so
/// every local time is unambiguous).
fn shanghai_ms(year: i32, month: u32, day: u32, hour: u32) -> i64 {
    Shanghai
        .with_ymd_and_hms(year, month, day, hour, 0, 0)
        .single()
        .expect("Asia/Shanghai has no DST, so every local time exists once")
        .timestamp_millis()
}

/// `ms` as an Asia/Shanghai local time.
fn local(ms: i64) -> DateTime<Tz> {
    DateTime::from_timestamp_millis(ms).expect("generated event time within chrono's range").with_timezone(&Shanghai)
}

/// splitmix64: tiny, fast, and its output does not depend on any crate's version, which is
/// what "same options => same bytes" needs.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)` with 53 bits, exactly as many as an f64 mantissa holds.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n >= 1`); the modulo bias is below 2^-40 for every `n` used here.
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi` (`lo <= hi`).
    fn between(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below(hi.abs_diff(lo) + 1) as i64
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// The splitmix64 finalizer: also used on its own to give entities (users, items) fixed
/// attributes without keeping a table of them.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The record stream behind [`generate`] and [`live`].
struct Stream {
    scenario: Scenario,
    opts: GenOptions,
    rng: Rng,
    index: i64,
}

impl Iterator for Stream {
    type Item = GenRecord;

    fn next(&mut self) -> Option<GenRecord> {
        let o = &self.opts;
        let due = o.start_ms.saturating_add(self.index.saturating_mul(o.step_ms));
        self.index += 1;

        // One roll picks the kind, so the shares are exact probabilities and never overlap.
        let roll = self.rng.unit();
        let kind = if roll < o.bad_share {
            RecordKind::Bad
        } else if roll < o.bad_share + o.late_share {
            RecordKind::Late
        } else if roll < o.bad_share + o.late_share + o.out_of_order_share {
            RecordKind::OutOfOrder
        } else {
            RecordKind::InOrder
        };
        let event_ms = match kind {
            // At least 1 ms back, so a record of this kind really is out of order.
            RecordKind::OutOfOrder => due - self.rng.between(1, o.ooo_max_ms.max(1)),
            RecordKind::Late => {
                let min = o.late_min_ms.max(1);
                due - self.rng.between(min, min.saturating_mul(2))
            }
            RecordKind::InOrder | RecordKind::Bad => due,
        };

        let dims = Dims { seed: o.seed, cardinality: o.cardinality.max(1) };
        let mut topic = None;
        let (key, fields) = match self.scenario {
            Scenario::S1 => s1(&mut self.rng, &dims, event_ms),
            Scenario::S2a => s2a(&mut self.rng, &dims, event_ms),
            Scenario::S2b => s2b(&mut self.rng, &dims, event_ms),
            Scenario::S3 => {
                let (t, key, fields) = s3(&mut self.rng, &dims, event_ms, self.index - 1);
                topic = Some(t);
                if t == S3_ROOMS {
                    // Table records are never moved in time nor spoiled.
                    let partition = partition_for(key.as_bytes(), self.opts.partitions);
                    return Some(GenRecord {
                        partition,
                        key: key.into_bytes(),
                        payload: encode(&fields).into_bytes(),
                        kind: RecordKind::InOrder,
                        topic,
                    });
                }
                (key, fields)
            }
            Scenario::S4 => s4(&mut self.rng, &dims, event_ms),
            Scenario::S5 => s5(&mut self.rng, &dims, event_ms),
        };
        // A bad record starts as a good one so it keeps a realistic key and partition.
        let payload = if kind == RecordKind::Bad { spoil(self.scenario, &mut self.rng, fields, event_ms) } else { encode(&fields) };
        let partition = partition_for(key.as_bytes(), self.opts.partitions);
        Some(GenRecord { partition, key: key.into_bytes(), payload: payload.into_bytes(), kind, topic })
    }
}

/// A JSON object's fields in the order the seeds print them.
type Fields = Vec<(&'static str, Value)>;

/// Writes the fields as a JSON object. Built by hand rather than through `serde_json::Map`
/// so the keys keep the seeds' order whatever serde_json features other crates switch on.
fn encode(fields: &[(&'static str, Value)]) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Value::from(*name).to_string());
        out.push(':');
        out.push_str(&value.to_string());
    }
    out.push('}');
    out
}

/// What the per-scenario builders need besides the PRNG.
struct Dims {
    seed: u64,
    cardinality: u64,
}

impl Dims {
    /// A fixed pseudo-random attribute of entity `id` (e.g. a user's province): the same
    /// entity gets the same value in every record, as in real data. `salt` keeps different
    /// attributes of one entity independent.
    fn attr(&self, id: u64, salt: u64) -> u64 {
        mix(self.seed ^ mix(id ^ mix(salt)))
    }

    /// `cardinality / per`, kept within `lo..=hi`.
    fn scaled(&self, per: u64, lo: u64, hi: u64) -> u64 {
        (self.cardinality / per).clamp(lo, hi)
    }
}

/// The `product_id`s of S1's events with `cardinality` distinct users.
pub fn s1_products(cardinality: u64) -> std::ops::Range<u64> {
    101..101 + Dims { seed: 0, cardinality }.scaled(100, 5, 900)
}

/// S1 `uvpv-demo`: ~90 % page views, ~10 % purchases; key = user_id.
fn s1(rng: &mut Rng, d: &Dims, ms: i64) -> (String, Fields) {
    let user = 1 + rng.below(d.cardinality);
    let products = s1_products(d.cardinality);
    let product = products.start + rng.below(products.end - products.start);
    let record_type = u8::from(rng.unit() < 0.1);
    // The seed's example gives user 6 the address 100.0.0.6: the address follows the user.
    let ip = format!("100.0.{}.{}", (user >> 8) & 0xff, user & 0xff);
    let fields = vec![
        ("record_type", Value::from(record_type)),
        ("user_id", Value::from(user)),
        ("client_ip", Value::from(ip)),
        ("product_id", Value::from(product)),
        ("create_time", Value::from(local(ms).format(TIME_FORMAT).to_string())),
    ];
    (user.to_string(), fields)
}

/// S2a `game_consume_log`: spend in tenths; `appkey5` is refund-heavy so some (app key, day)
/// sums are at or below zero and `having total > 0` has something to drop; key = appkey.
fn s2a(rng: &mut Rng, d: &Dims, ms: i64) -> (String, Fields) {
    let app = 1 + rng.below(5);
    let tenths = if app == 5 {
        rng.between(-600, 200)
    } else {
        let r = rng.unit();
        if r < 0.8 {
            rng.between(1, 999)
        } else if r < 0.9 {
            0
        } else {
            rng.between(-499, -1)
        }
    };
    let role = 1 + rng.below(d.cardinality);
    let server = 1 + d.attr(role, 1) % d.scaled(100, 1, 100);
    let appkey = format!("appkey{app}");
    let fields = vec![
        ("appkey", Value::from(appkey.clone())),
        ("servertime", Value::from(local(ms).format(TIME_FORMAT).to_string())),
        // The division is correctly rounded, so the number prints with exactly one decimal.
        ("consumenum", Value::from(tenths as f64 / 10.0)),
        ("roleid", Value::from(format!("roleid{role}"))),
        ("serverid", Value::from(server.to_string())),
    ];
    (appkey, fields)
}

/// S2b `pv-uv`: each account has a home device and, for ~10 % of its events, a second one
/// with its own address, so UV by address differs from the number of accounts; key =
/// account_id.
fn s2b(rng: &mut Rng, d: &Dims, ms: i64) -> (String, Fields) {
    const CLIENTS: [&str; 5] = ["mi10", "iphone12", "huawei-p40", "oppo-reno5", "vivo-x60"];
    let account = 1 + rng.below(d.cardinality);
    let device = account * 2 + u64::from(rng.unit() < 0.1);
    let h = d.attr(device, 2);
    let ip = format!("{}.{}.{}.{}", 1 + h % 223, (h >> 8) & 0xff, (h >> 16) & 0xff, 1 + (h >> 24) % 254);
    let client = CLIENTS[(d.attr(device, 3) % CLIENTS.len() as u64) as usize];
    let t = local(ms);
    let account_id = format!("id{account}");
    let fields = vec![
        ("account_id", Value::from(account_id.clone())),
        ("client_ip", Value::from(ip)),
        ("client_info", Value::from(client)),
        ("p_dt", Value::from(t.format("%Y-%m-%d").to_string())),
        ("c_time", Value::from(t.format(TIME_FORMAT).to_string())),
    ];
    (account_id, fields)
}

/// S3's rooms: the first nine tenths are in the room table from the start, the rest join it
/// later (their early events find no module); a hot few get most of the traffic.
fn s3_rooms(d: &Dims) -> (u64, u64) {
    let rooms = d.scaled(40, 10, 10_000);
    (rooms, rooms - rooms / 10)
}

fn s3_room_id(room: u64) -> i64 {
    20_210_800 + room as i64
}

/// S3: the room table first (one record per listed room), then viewer events (~70 %), gift
/// events (~29 %) and room updates (~1 %: a room moves to another module, or an unlisted
/// room is listed). Returns (topic, key, fields); viewers and gifts are keyed by user, the
/// table by room id.
fn s3(rng: &mut Rng, d: &Dims, ms: i64, index: i64) -> (&'static str, String, Fields) {
    let (rooms, listed) = s3_rooms(d);
    let table = |room: u64, module: u64| {
        let fields = vec![("module_id", Value::from(100 + module)), ("room_name", Value::from(format!("room {room}")))];
        (S3_ROOMS, s3_room_id(room).to_string(), fields)
    };
    if let Ok(room) = u64::try_from(index) {
        if room < listed {
            return table(room, 1 + d.attr(room, 11) % 6);
        }
    }
    let r = rng.unit();
    if r < 0.01 {
        return table(rng.below(rooms), 1 + rng.below(6));
    }
    let user = 1 + rng.below(d.cardinality);
    let u = rng.unit();
    let room = s3_room_id(((u * u * rooms as f64) as u64).min(rooms - 1));
    let u = (d.attr(user, 9) >> 11) as f64 / (1u64 << 53) as f64;
    let province = PROVINCES[(u * u * PROVINCES.len() as f64) as usize];
    let ip = format!("123.0.{}.{}", d.attr(user, 12) % 256, d.attr(user, 13) % 256);
    let t = local(ms).format(TIME_FORMAT).to_string();
    let fields = if r < 0.71 {
        let leave = local(ms + rng.between(0, 30 * MINUTE)).format(TIME_FORMAT).to_string();
        vec![
            ("user_id", Value::from(user)),
            ("ip", Value::from(ip)),
            ("room_id", Value::from(room)),
            ("arrive_time", Value::from(t.clone())),
            ("create_time", Value::from(t)),
            ("leave_time", Value::from(leave)),
            ("region", Value::from(1100 + d.attr(user, 14) % 100)),
            ("grade", Value::from(1 + d.attr(user, 15) % 5)),
            ("province", Value::from(province)),
        ]
    } else {
        let g = rng.unit();
        vec![
            ("user_id", Value::from(user)),
            ("gift_type", Value::from(1 + (g * g * 6.0) as u64)),
            ("gift_total_amount", Value::from(1 + rng.below(20) * rng.below(25))),
            ("room_id", Value::from(room)),
            ("ip", Value::from(ip)),
            ("create_time", Value::from(t.clone())),
            ("update_time", Value::from(t)),
        ]
    };
    let topic = if r < 0.71 { S3_VIEWS } else { S3_GIFTS };
    (topic, user.to_string(), fields)
}

/// The provinces of S4, most populous online-shopping regions first (the skew favours the
/// front of the list).
const PROVINCES: [&str; 31] = [
    "广东",
    "浙江",
    "江苏",
    "上海",
    "北京",
    "山东",
    "四川",
    "河南",
    "湖北",
    "福建",
    "湖南",
    "安徽",
    "河北",
    "陕西",
    "辽宁",
    "重庆",
    "天津",
    "江西",
    "广西",
    "云南",
    "山西",
    "黑龙江",
    "吉林",
    "贵州",
    "内蒙古",
    "新疆",
    "甘肃",
    "海南",
    "宁夏",
    "青海",
    "西藏",
];

/// S4 `user-behavior`: a user's age range, gender and province, and an item's category,
/// brand and merchant, are fixed per entity; the time is only month and day; key = user_id.
fn s4(rng: &mut Rng, d: &Dims, ms: i64) -> (String, Fields) {
    let user = 1 + rng.below(d.cardinality);
    let item = 1 + rng.below(d.cardinality * 4);
    let cat = 1 + d.attr(item, 4) % d.scaled(50, 5, 10_000);
    let merchant = 1 + d.attr(item, 5) % d.scaled(10, 5, 100_000);
    let brand = 1 + d.attr(item, 6) % d.scaled(20, 5, 100_000);
    let r = rng.unit();
    let action = if r < 0.85 {
        0 // click
    } else if r < 0.92 {
        1 // add to cart
    } else if r < 0.97 {
        2 // buy
    } else {
        3 // follow
    };
    // The seed's data set documents age ranges 0 (unknown) to 7.
    let age_range = d.attr(user, 7) % 8;
    let gender = match d.attr(user, 8) % 100 {
        0..=44 => 0,  // female
        45..=89 => 1, // male
        _ => 2,       // unknown
    };
    // Squaring a fixed uniform per user skews users towards the front of the list.
    let u = (d.attr(user, 9) >> 11) as f64 / (1u64 << 53) as f64;
    let province = PROVINCES[(u * u * PROVINCES.len() as f64) as usize];
    let t = local(ms);
    let fields = vec![
        ("user_id", Value::from(user.to_string())),
        ("item_id", Value::from(item.to_string())),
        ("cat_id", Value::from(cat.to_string())),
        ("merchant_id", Value::from(merchant.to_string())),
        ("brand_id", Value::from(brand.to_string())),
        ("month", Value::from(t.month())),
        ("day", Value::from(t.day())),
        ("action", Value::from(action)),
        ("age_range", Value::from(age_range)),
        ("gender", Value::from(gender)),
        ("province", Value::from(province)),
    ];
    (user.to_string(), fields)
}

/// S5 `user-clicks`: product popularity is skewed (a squared uniform, so low product numbers
/// are hot) to give top-N a clear answer; key = product_id.
fn s5(rng: &mut Rng, d: &Dims, ms: i64) -> (String, Fields) {
    let products = d.scaled(5, 10, 9_999);
    let u = rng.unit();
    let product = format!("p{:04}", 1 + ((u * u * products as f64) as u64).min(products - 1));
    let r = rng.unit();
    let action = if r < 0.7 {
        "click"
    } else if r < 0.9 {
        "view"
    } else {
        "cart"
    };
    let user = 1 + rng.below(d.cardinality);
    let fields = vec![
        ("event_time", Value::from(ms)),
        ("product_id", Value::from(product.clone())),
        ("action", Value::from(action)),
        ("user_id", Value::from(format!("u_{user:04}"))),
    ];
    (product, fields)
}

/// The field a missing-time record lacks (for S4, one of the two parts is enough).
fn time_field(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::S1 => "create_time",
        Scenario::S2a => "servertime",
        Scenario::S2b => "c_time",
        Scenario::S3 => "create_time",
        Scenario::S4 => "day",
        Scenario::S5 => "event_time",
    }
}

/// Turns a good record into a malformed one, picking one of the failures the seeds meet in
/// practice (they run with `json.ignore-parse-errors`).
fn spoil(scenario: Scenario, rng: &mut Rng, mut fields: Fields, ms: i64) -> String {
    let (name, value) = match rng.below(6) {
        // Not JSON at all: a record cut off mid-way. The object only closes at its last
        // byte, so any prefix is invalid; the cut respects UTF-8 so only JSON is broken.
        0 => {
            let text = encode(&fields);
            let mut cut = text.len() / 2;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            return text[..cut].to_string();
        }
        // Valid JSON, but not an object.
        1 => return rng.pick(&["[1,2]", "42", "\"click\""]).to_string(),
        // A JSON object without its event time.
        2 => {
            fields.retain(|(field, _)| *field != time_field(scenario));
            return encode(&fields);
        }
        // A time of the right type that cannot be read.
        3 => match scenario {
            Scenario::S4 if rng.below(2) == 0 => ("month", Value::from(13)),
            Scenario::S4 => ("day", Value::from(45)),
            Scenario::S5 => ("event_time", Value::from("2022-12-27 16:50:00")),
            _ => (time_field(scenario), Value::from(rng.pick(&["2021-13-45 99:00:00", "yesterday"]))),
        },
        // A time of the wrong type.
        4 => match scenario {
            Scenario::S4 => ("day", Value::from("eleven")),
            Scenario::S5 => ("event_time", Value::from("abc")),
            // Epoch seconds where a local time string is expected.
            _ => (time_field(scenario), Value::from(ms.div_euclid(SECOND))),
        },
        // Another field of the wrong type (the shipped configs declare the seeds' types).
        _ => match scenario {
            Scenario::S1 => ("record_type", Value::from("zero")),
            Scenario::S2a => ("consumenum", Value::from("n/a")),
            Scenario::S4 => ("action", Value::from("buy")),
            Scenario::S3 => ("room_id", Value::from("room-9")),
            Scenario::S2b | Scenario::S5 => (time_field(scenario), Value::Null),
        },
    };
    if let Some(field) = fields.iter_mut().find(|(field, _)| *field == name) {
        field.1 = value;
    }
    encode(&fields)
}

/// The partition Kafka's Java default partitioner gives a keyed record, so generated data
/// lands where the seeds' own producers would have put it.
fn partition_for(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's `Utils.murmur2` (MurmurHash2, seed `0x9747b28c`).
fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDate, NaiveDateTime};
    use serde_json::Map;
    use std::collections::{BTreeMap, HashMap};

    const ALL: [Scenario; 5] = [Scenario::S1, Scenario::S2a, Scenario::S2b, Scenario::S4, Scenario::S5];

    fn opts(s: Scenario, count: usize) -> GenOptions {
        GenOptions { count, ..GenOptions::for_scenario(s) }
    }

    fn object(r: &GenRecord) -> Option<Map<String, Value>> {
        match serde_json::from_slice::<Value>(&r.payload) {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        }
    }

    fn shanghai(naive: NaiveDateTime) -> Option<i64> {
        Shanghai.from_local_datetime(&naive).single().map(|t| t.timestamp_millis())
    }

    /// An independent reading of a payload's event time, as a config for the scenario
    /// would read it; `None` when the record has no usable time.
    fn event_time(s: Scenario, r: &GenRecord, year: i32) -> Option<i64> {
        let m = object(r)?;
        match s {
            Scenario::S5 => m.get("event_time")?.as_i64(),
            Scenario::S4 => {
                let month = u32::try_from(m.get("month")?.as_u64()?).ok()?;
                let day = u32::try_from(m.get("day")?.as_u64()?).ok()?;
                shanghai(NaiveDate::from_ymd_opt(year, month, day)?.and_hms_opt(0, 0, 0)?)
            }
            _ => {
                let text = m.get(time_field(s))?.as_str()?;
                shanghai(NaiveDateTime::parse_from_str(text, TIME_FORMAT).ok()?)
            }
        }
    }

    /// The finest time step a scenario's payload can express.
    fn resolution(s: Scenario) -> i64 {
        match s {
            Scenario::S4 => DAY,
            Scenario::S5 => 1,
            _ => SECOND,
        }
    }

    #[test]
    fn same_options_give_identical_records() {
        for s in ALL {
            let o = opts(s, 2_000);
            assert_eq!(generate(s, &o), generate(s, &o), "{s:?}");
            let other = GenOptions { seed: 7, ..o.clone() };
            assert_ne!(generate(s, &o), generate(s, &other), "{s:?}: the seed must matter");
        }
    }

    #[test]
    fn live_starts_with_the_generated_records() {
        for s in ALL {
            let o = opts(s, 500);
            let live: Vec<_> = live(s, &o).take(800).collect();
            assert_eq!(live[..500], generate(s, &o)[..], "{s:?}");
        }
    }

    #[test]
    fn shares_are_roughly_right() {
        for s in ALL {
            let o = opts(s, 40_000);
            let records = generate(s, &o);
            for (kind, want) in [(RecordKind::Bad, o.bad_share), (RecordKind::Late, o.late_share), (RecordKind::OutOfOrder, o.out_of_order_share)] {
                let got = records.iter().filter(|r| r.kind == kind).count() as f64 / o.count as f64;
                assert!((got - want).abs() < want * 0.25, "{s:?} {kind:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn event_times_follow_the_kind() {
        for s in ALL {
            let o = opts(s, 20_000);
            let year = local(o.start_ms).year();
            for (i, r) in generate(s, &o).iter().enumerate() {
                let due = o.start_ms + i as i64 * o.step_ms;
                let Some(t) = event_time(s, r, year) else {
                    assert_eq!(r.kind, RecordKind::Bad, "{s:?} #{i} has no time: {r:?}");
                    continue;
                };
                // The payload truncates the exact time to its resolution.
                let (min_back, max_back) = match r.kind {
                    RecordKind::InOrder => (0, 0),
                    RecordKind::OutOfOrder => (1, o.ooo_max_ms),
                    RecordKind::Late => (o.late_min_ms, 2 * o.late_min_ms),
                    // Bad for another field's type: its time is as due.
                    RecordKind::Bad => (0, 0),
                };
                assert!(t <= due - min_back && t > due - max_back - resolution(s), "{s:?} #{i}: {r:?}");
            }
        }
    }

    #[test]
    fn s3_lists_its_rooms_then_mixes_views_gifts_and_updates() {
        let o = opts(Scenario::S3, 20_000);
        let records = generate(Scenario::S3, &o);
        let (rooms, listed) = s3_rooms(&Dims { seed: o.seed, cardinality: o.cardinality });
        assert!(records[..listed as usize].iter().all(|r| r.topic == Some(S3_ROOMS)));
        let count =
            |t: &str| records[listed as usize..].iter().filter(|r| r.topic == Some(t)).count() as f64 / (records.len() - listed as usize) as f64;
        assert!((count(S3_VIEWS) - 0.70).abs() < 0.02 && (count(S3_GIFTS) - 0.29).abs() < 0.02 && (count(S3_ROOMS) - 0.01).abs() < 0.005);
        let mut rooms_seen = std::collections::BTreeSet::new();
        for r in records.iter().filter(|r| r.kind != RecordKind::Bad) {
            let m = object(r).expect("a good record is a JSON object");
            match r.topic {
                Some(S3_ROOMS) => {
                    assert!((101..=106).contains(&m["module_id"].as_i64().unwrap()));
                    rooms_seen.insert(String::from_utf8(r.key.clone()).unwrap());
                }
                Some(S3_VIEWS) => assert!(m["province"].is_string() && (1..=5).contains(&m["grade"].as_i64().unwrap())),
                Some(S3_GIFTS) => assert!((1..=6).contains(&m["gift_type"].as_i64().unwrap()) && m["gift_total_amount"].as_i64().unwrap() > 0),
                other => panic!("{other:?}"),
            }
            if r.topic != Some(S3_ROOMS) {
                let room = m["room_id"].as_i64().unwrap();
                assert!((s3_room_id(0)..s3_room_id(rooms)).contains(&room));
                assert_eq!(String::from_utf8(r.key.clone()).unwrap(), m["user_id"].to_string());
            }
        }
        assert!(rooms_seen.len() as u64 > listed, "later updates list rooms that were not listed at first");
    }

    #[test]
    fn bad_records_are_a_mix() {
        for s in ALL {
            let records = generate(s, &opts(s, 20_000));
            let bad: Vec<_> = records.iter().filter(|r| r.kind == RecordKind::Bad).collect();
            let not_json = bad.iter().filter(|r| serde_json::from_slice::<Value>(&r.payload).is_err()).count();
            let not_object = bad
                .iter()
                .filter(|r| matches!(serde_json::from_slice::<Value>(&r.payload), Ok(Value::Array(_) | Value::Number(_) | Value::String(_))))
                .count();
            let no_time = bad.iter().filter(|r| object(r).is_some_and(|m| !m.contains_key(time_field(s)))).count();
            let unreadable = bad.len() - not_json - not_object - no_time;
            for (what, n) in [("not JSON", not_json), ("not an object", not_object), ("no time", no_time), ("unreadable time", unreadable)] {
                assert!(n > 0, "{s:?}: no bad record that is {what}");
            }
            assert!(bad.iter().all(|r| std::str::from_utf8(&r.payload).is_ok()), "{s:?}");
        }
    }

    #[test]
    fn payloads_have_the_scenario_fields() {
        for s in ALL {
            let o = opts(s, 5_000);
            for r in generate(s, &o).iter().filter(|r| r.kind != RecordKind::Bad) {
                let m = object(r).expect("a good record is a JSON object");
                let int = |f: &str| m[f].as_i64().unwrap_or_else(|| panic!("{s:?} {f}: {r:?}"));
                let text = |f: &str| m[f].as_str().unwrap_or_else(|| panic!("{s:?} {f}: {r:?}")).to_string();
                let key = String::from_utf8(r.key.clone()).unwrap();
                let names: Vec<&str> = m.keys().map(String::as_str).collect();
                match s {
                    Scenario::S1 => {
                        assert!(matches!(int("record_type"), 0 | 1));
                        let user = int("user_id");
                        assert!((1..=o.cardinality as i64).contains(&user));
                        assert_eq!(text("client_ip"), format!("100.0.{}.{}", user / 256, user % 256));
                        assert!((101..=150).contains(&int("product_id")));
                        assert_eq!(key, user.to_string());
                        assert_eq!(names.len(), 5);
                    }
                    Scenario::S2a => {
                        assert!(text("appkey").strip_prefix("appkey").is_some_and(|n| matches!(n, "1" | "2" | "3" | "4" | "5")));
                        assert!(text("roleid").starts_with("roleid"));
                        assert!(text("serverid").parse::<u32>().is_ok());
                        let spend = m["consumenum"].as_f64().unwrap();
                        assert!(m["consumenum"].to_string().split('.').nth(1).is_some_and(|d| d.len() == 1));
                        assert_eq!((spend * 10.0).round() / 10.0, spend);
                        assert_eq!(key, text("appkey"));
                        assert_eq!(names.len(), 5);
                    }
                    Scenario::S2b => {
                        assert!(text("account_id").starts_with("id"));
                        let ip: Vec<u8> = text("client_ip").split('.').map(|p| p.parse().unwrap()).collect();
                        assert_eq!(ip.len(), 4);
                        assert!(!text("client_info").is_empty());
                        assert_eq!(text("p_dt"), text("c_time")[..10]);
                        assert_eq!(key, text("account_id"));
                        assert_eq!(names.len(), 5);
                    }
                    // Three topics: see `s3_lists_its_rooms_then_mixes_views_gifts_and_updates`.
                    Scenario::S3 => {}
                    Scenario::S4 => {
                        for f in ["user_id", "item_id", "cat_id", "merchant_id", "brand_id"] {
                            assert!(text(f).parse::<u64>().is_ok(), "{f}");
                        }
                        assert!((0..=3).contains(&int("action")));
                        assert!((0..=7).contains(&int("age_range")));
                        assert!((0..=2).contains(&int("gender")));
                        assert!(PROVINCES.contains(&text("province").as_str()));
                        assert_eq!(key, text("user_id"));
                        assert_eq!(names.len(), 11);
                    }
                    Scenario::S5 => {
                        assert!(text("product_id").starts_with('p'));
                        assert!(["click", "view", "cart"].contains(&text("action").as_str()));
                        assert!(text("user_id").starts_with("u_"));
                        assert_eq!(key, text("product_id"));
                        assert_eq!(names.len(), 4);
                    }
                }
            }
        }
    }

    #[test]
    fn payloads_keep_the_seed_field_order_and_formats() {
        let first = |s: Scenario| {
            let o = GenOptions { bad_share: 0.0, late_share: 0.0, out_of_order_share: 0.0, ..opts(s, 1) };
            String::from_utf8(generate(s, &o)[0].payload.clone()).unwrap()
        };
        assert!(first(Scenario::S1).starts_with(r#"{"record_type":"#));
        assert!(first(Scenario::S1).ends_with(r#""create_time":"2021-09-06 16:00:00"}"#));
        assert!(first(Scenario::S2a).contains(r#""servertime":"2020-09-29 20:00:00","consumenum":"#));
        assert!(first(Scenario::S2b).contains(r#""p_dt":"2021-12-01","c_time":"2021-12-01 22:00:00"}"#));
        assert!(first(Scenario::S4).contains(r#""month":11,"day":1,"action":"#));
        assert!(first(Scenario::S5).starts_with(r#"{"event_time":1672131000000,"product_id":"p"#));
    }

    #[test]
    fn some_day_totals_are_not_positive() {
        let o = opts(Scenario::S2a, 10_000);
        let mut sums: BTreeMap<(String, String), f64> = BTreeMap::new();
        for r in generate(Scenario::S2a, &o).iter().filter(|r| r.kind != RecordKind::Bad).filter_map(object) {
            let day = r["servertime"].as_str().unwrap()[..10].to_string();
            *sums.entry((r["appkey"].as_str().unwrap().to_string(), day)).or_default() += r["consumenum"].as_f64().unwrap();
        }
        assert!(sums.values().any(|v| *v <= 0.0) && sums.values().any(|v| *v > 0.0), "{sums:?}");
    }

    #[test]
    fn s5_products_are_skewed() {
        let mut clicks: HashMap<String, u64> = HashMap::new();
        for r in generate(Scenario::S5, &opts(Scenario::S5, 20_000)).iter().filter(|r| r.kind != RecordKind::Bad).filter_map(object) {
            *clicks.entry(r["product_id"].as_str().unwrap().to_string()).or_default() += 1;
        }
        let mut counts: Vec<u64> = clicks.into_values().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        assert!(counts[0] > 5 * counts[counts.len() / 2], "{counts:?}");
    }

    #[test]
    fn partitions_follow_the_key() {
        let o = GenOptions { partitions: 4, ..opts(Scenario::S1, 5_000) };
        let mut seen: HashMap<Vec<u8>, i32> = HashMap::new();
        for r in generate(Scenario::S1, &o) {
            assert!((0..4).contains(&r.partition));
            assert_eq!(*seen.entry(r.key.clone()).or_insert(r.partition), r.partition);
        }
        assert_eq!(seen.values().collect::<std::collections::HashSet<_>>().len(), 4);
    }

    #[test]
    fn murmur2_matches_kafka() {
        // Kafka's own test vectors (clients' UtilsTest.testMurmur2).
        for (data, want) in [
            (&b"21"[..], -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ] {
            assert_eq!(murmur2(data), want, "{}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn topics_match_the_scenarios() {
        let topics: Vec<_> = ALL.iter().map(|s| topic(*s)).collect();
        assert_eq!(topics, ["uvpv-demo", "game_consume_log", "pv-uv", "user-behavior", "user-clicks"]);
    }
}
