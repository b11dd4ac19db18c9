//! Scenario 16, AggregateReadings: one device's day of readings (one a
//! second, `sizes.aggregate_readings`) at 1 440 buckets (a minute each),
//! p50/p99:
//! - from memory, the readings published through the broker (over about
//!   two seconds, so the bucket is their span / 1 440: the same readings
//!   and buckets as a day, folded the same way), next to paging the same
//!   readings out with ListReadings;
//! - from the store, in a table of `sizes.aggregate_stored` readings (the
//!   device's, between other devices'), next to the same aggregation
//!   written by hand in SQL with `date_bin` and run by `psql` on the same
//!   table (its own timing, `\timing`: the server's work and the transfer,
//!   none of psql's start), and next to ListReadings of the same range.

use std::time::{Duration, Instant};

use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, AggregateReadingsRequest, AggregateReadingsResponse,
        ListReadingsRequest,
    },
};
use prost_types::Timestamp;
use rumqttc::QoS;
use tonic::transport::Channel;

use crate::{
    postgres,
    support::{
        grpc::wait_for_stored,
        measure::{percentile, time_calls},
        publish::publish,
        report::Table,
        service::Service,
        sizes::Sizes,
    },
};

/// Buckets per aggregation: a day of minutes.
const BUCKETS: u64 = 1_440;
/// 2026-01-01T00:00:00Z, where the stored day starts.
const DAY_START: u64 = 1_767_225_600_000_000;
/// Timed calls per row (after a tenth as many untimed).
const CALLS: usize = 40;
/// Timed raw fetches per row: each is ~87 pages for a day.
const FETCHES: usize = 5;

pub async fn run(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    from_memory(table, broker, sizes).await;
    from_the_store(table, broker, sizes).await;
}

fn timestamp(micros: u64) -> Option<Timestamp> {
    Some(Timestamp::from(
        std::time::UNIX_EPOCH + Duration::from_micros(micros),
    ))
}

fn aggregate_request(device: &str, start: u64, end: u64, bucket: u64) -> AggregateReadingsRequest {
    AggregateReadingsRequest {
        device_id: device.into(),
        fields: vec![FIELD_POINTER.into()],
        start_time: timestamp(start),
        end_time: timestamp(end),
        bucket: Some(prost_types::Duration {
            seconds: (bucket / 1_000_000) as i64,
            nanos: (bucket % 1_000_000 * 1_000) as i32,
        }),
    }
}

/// The field aggregated: the publishers' and the table's temperature.
const FIELD_POINTER: &str = "/temp";

/// AggregateReadings `n` times; the sorted nanoseconds, and one answer.
async fn time_aggregate(
    client: &DeviceHubClient<Channel>,
    request: AggregateReadingsRequest,
    n: usize,
) -> (Vec<u64>, AggregateReadingsResponse) {
    let call = |client: &DeviceHubClient<Channel>| {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            client
                .aggregate_readings(request)
                .await
                .unwrap()
                .into_inner()
        }
    };
    let answer = call(client).await;
    let times = time_calls(n, || {
        let call = call(client);
        async move {
            call.await;
        }
    })
    .await;
    (times, answer)
}

/// Every reading of `device` in `[start, end)` through ListReadings, pages
/// of 1 000, `n` times; the sorted nanoseconds, and how many readings.
async fn time_raw(
    client: &DeviceHubClient<Channel>,
    device: &str,
    start: u64,
    end: u64,
    n: usize,
) -> (Vec<u64>, usize) {
    let fetch = |client: &DeviceHubClient<Channel>| {
        let mut client = client.clone();
        let device = device.to_owned();
        async move {
            let (mut got, mut page_token) = (0, String::new());
            loop {
                let request = ListReadingsRequest {
                    device_id: device.clone(),
                    start_time: timestamp(start),
                    end_time: timestamp(end),
                    page_size: 1000,
                    page_token,
                    oldest_first: true,
                    ..Default::default()
                };
                let page = client.list_readings(request).await.unwrap().into_inner();
                got += page.readings.len();
                if page.next_page_token.is_empty() {
                    return got;
                }
                page_token = page.next_page_token;
            }
        }
    };
    let count = fetch(client).await;
    let times = time_calls(n, || {
        let fetch = fetch(client);
        async move {
            fetch.await;
        }
    })
    .await;
    (times, count)
}

fn rows(table: &Table, name: &str, ours: &[u64], baseline: &[u64], notes: &str) {
    for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
        table.row(
            &format!("16. AggregateReadings {name} {label} (ms)"),
            percentile(ours, p) / 1e6,
            percentile(baseline, p) / 1e6,
            "ms",
            notes,
        );
    }
}

fn counted(answer: &AggregateReadingsResponse) -> (usize, i64) {
    let buckets = &answer.series[0].buckets;
    (buckets.len(), buckets.iter().map(|b| b.count).sum())
}

async fn from_memory(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let n = sizes.aggregate_readings;
    let service = Service::start(broker, &[]).await;
    let mut client = service.client().await;
    // Over about two seconds, so that 1 440 buckets are at least 1 ms.
    publish(
        broker,
        1,
        n,
        1,
        QoS::AtLeastOnce,
        Some(n / 2),
        Instant::now(),
    )
    .await;
    wait_for_stored(&mut client, n).await;
    let first = list_edge(&client, true).await;
    let end = list_edge(&client, false).await + 1;
    let bucket = (end - first).div_ceil(BUCKETS - 1).max(1_000);
    let request = aggregate_request("dev-0", first, end, bucket);
    let (times, answer) = time_aggregate(&client, request, CALLS).await;
    let (buckets, readings) = counted(&answer);
    assert_eq!(readings as u64, n, "every reading counted once");
    let (raw, fetched) = time_raw(&client, "dev-0", first, end, FETCHES).await;
    assert_eq!(fetched as u64, n);
    rows(
        table,
        "from memory",
        &times,
        &raw,
        &format!("{n} readings in {buckets} buckets; baseline: the same readings paged out with ListReadings (1 000 a page)"),
    );
    service.stop().await;
}

/// The received time of the device's oldest (or newest) buffered reading.
async fn list_edge(client: &DeviceHubClient<Channel>, oldest: bool) -> u64 {
    let request = ListReadingsRequest {
        device_id: "dev-0".into(),
        page_size: 1,
        oldest_first: oldest,
        ..Default::default()
    };
    let page = client
        .clone()
        .list_readings(request)
        .await
        .unwrap()
        .into_inner();
    let t = page.readings[0].received_at.unwrap();
    t.seconds as u64 * 1_000_000 + t.nanos as u64 / 1_000
}

async fn from_the_store(table: &Table, broker: &BrokerUrl, sizes: Sizes) {
    let pg = postgres::Postgres::start_with("");
    let (readings, stored) = (sizes.aggregate_readings, sizes.aggregate_stored);
    let url = fill_table(&pg, broker, readings, stored).await;
    let service = Service::start(broker, &["--store-url", &url]).await;
    let client = service.client().await;
    let (start, end) = (DAY_START, DAY_START + readings * 1_000_000);
    let bucket = (end - start) / BUCKETS;
    let request = aggregate_request("agg-0", start, end, bucket);
    let (times, answer) = time_aggregate(&client, request, CALLS).await;
    let (buckets, counted) = counted(&answer);
    assert_eq!(counted as u64, readings, "every reading counted once");
    let (psql, psql_buckets) = time_psql(&pg, start, end, bucket, CALLS);
    assert_eq!(psql_buckets, buckets, "the same buckets by hand");
    let notes = format!(
        "{readings} readings of one device in {buckets} buckets, {} in the table",
        stored / readings * readings
    );
    rows(
        table,
        "from the store",
        &times,
        &psql,
        &format!("{notes}; baseline: the same aggregation by hand in SQL (date_bin), psql's \\timing; target ≤ 1.5"),
    );
    let (raw, fetched) = time_raw(&client, "agg-0", start, end, FETCHES).await;
    assert_eq!(fetched as u64, readings);
    rows(
        table,
        "from the store vs ListReadings",
        &times,
        &raw,
        &format!("{notes}; baseline: the same readings paged out with ListReadings"),
    );
    service.stop().await;
}

/// A table where device `agg-0` has one reading a second from
/// [`DAY_START`] (its temperature a ramp), `readings` in all, between
/// readings of 997 other devices, `stored` or so readings in all; written
/// by SQL into a database whose migrations a service ran. Returns its URL.
async fn fill_table(
    pg: &postgres::Postgres,
    broker: &BrokerUrl,
    readings: u64,
    stored: u64,
) -> String {
    let url = pg.create_database("bench_aggregate");
    let service = Service::start(broker, &["--store-url", &url]).await;
    service.stop().await; // the migrations ran
    let per_second = (stored / readings).max(2);
    let step = 1_000_000 / per_second; // µs between rows
    pg.psql_in(
        "bench_aggregate",
        &format!(
            "INSERT INTO readings (seq, device_id, topic, payload, qos, retained, received_at, kind) \
             SELECT s + 1, d, 'devices/' || d || '/readings', \
                    convert_to('{{\"temp\":' || (20 + (s / {per_second}) % 600 / 10.0) || ',\"hum\":40,\"i\":' || s || '}}', 'UTF8'), \
                    1, false, \
                    timestamptz '2026-01-01' + (s / {per_second}) * interval '1 second' \
                        + (s % {per_second}) * {step} * interval '1 microsecond', 0 \
             FROM generate_series(0, {} - 1) s, \
                  LATERAL (SELECT CASE WHEN s % {per_second} = 0 THEN 'agg-0' \
                                  ELSE 'dev-' || (s % 997) END AS d) dev",
            readings * per_second
        ),
    );
    pg.psql_in(
        "bench_aggregate",
        &format!(
            "UPDATE devicehub_sequence SET next_seq = {}",
            readings * per_second + 1
        ),
    );
    pg.psql_in("bench_aggregate", "VACUUM ANALYZE readings");
    url
}

/// The aggregation as one would write it by hand, run `n` times (after a
/// tenth as many untimed) in one psql session with `\timing`; the sorted
/// nanoseconds, and how many buckets it gave.
fn time_psql(
    pg: &postgres::Postgres,
    start: u64,
    end: u64,
    bucket: u64,
    n: usize,
) -> (Vec<u64>, usize) {
    let at = |micros: u64| format!("timestamptz 'epoch' + {micros} * interval '1 microsecond'");
    let sql = format!(
        "SELECT date_bin({bucket} * interval '1 microsecond', received_at, timestamptz 'epoch') AS b, \
                count(v), min(v), max(v), avg(v), sum(v), \
                (array_agg(v ORDER BY seq))[1], (array_agg(v ORDER BY seq DESC))[1] \
         FROM (SELECT seq, received_at, \
                      (convert_from(payload, 'UTF8')::jsonb -> 'temp')::float8 AS v \
               FROM readings \
               WHERE device_id = 'agg-0' AND received_at >= {} AND received_at < {}) r \
         WHERE v IS NOT NULL GROUP BY b ORDER BY b;\n",
        at(start),
        at(end)
    );
    let buckets = pg
        .psql_in("bench_aggregate", sql.trim_end())
        .lines()
        .count();
    let script = format!("\\o /dev/null\n\\timing on\n{}", sql.repeat(n + n / 10));
    let output = pg.psql_script_in("bench_aggregate", &script);
    let mut times: Vec<u64> = output
        .lines()
        .filter_map(|l| l.strip_prefix("Time: "))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| (ms * 1e6) as u64)
        .skip(n / 10)
        .collect();
    assert_eq!(times.len(), n, "psql timed every run: {output}");
    times.sort_unstable();
    (times, buckets)
}
