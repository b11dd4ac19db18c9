//! AggregateReadings against ListReadings: the test computes the buckets
//! itself from the readings ListReadings returns over the same range and
//! compares every figure, from memory, from the store (readings evicted
//! from a small buffer) and over a range that spans both; bucket edges,
//! empty buckets, values that are not numbers, payloads that are not JSON
//! (one that makes the store's fast statement fail), the 10 000-bucket
//! limit, validation and the scope.

use crate::common;

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use common::{postgres::Postgres, tempdir::TempDir, tokens::*, *};
use devicehub::proto::{
    device_hub_client::DeviceHubClient, AggregateReadingsRequest, Bucket, ListReadingsRequest,
    Reading,
};
use prost_types::Timestamp;
use rumqttc::QoS;
use tonic::{transport::Channel, Code};

const DEVICE: &str = "agg-1";
const FIELDS: [&str; 4] = ["/t", "/n/v", "/s", ""];

/// Where the payloads no float or `jsonb` holds start (and one that
/// starts like a JSON document and is not): the store answers ranges from
/// there on with its slower statement, those before with its fast one.
const HOSTILE_FROM: u64 = 200;

/// The payload of reading `i`, and what it holds at each of [`FIELDS`]:
/// mostly numbers, and every kind of value and payload that must not count.
fn reading(i: u64) -> (Vec<u8>, [Option<f64>; 4]) {
    let t = (i as f64) * 0.37 - 20.0;
    let hostile = i >= HOSTILE_FROM;
    match i % 23 {
        _ if i == HOSTILE_FROM + 50 => (b"{\"t\": 1,".to_vec(), [None; 4]),
        5 => (
            b"{\"t\": \"warm\", \"n\": {\"v\": true}}".to_vec(),
            [None; 4],
        ),
        9 => (b"not json".to_vec(), [None; 4]),
        15 => {
            let bare = i as f64 / 8.0;
            (
                format!("{bare}").into_bytes(),
                [None, None, None, Some(bare)],
            )
        }
        17 => (b"{\"n\": [1, 2], \"s\": null}".to_vec(), [None; 4]),
        19 => (b"online".to_vec(), [None; 4]),
        // A number no float holds spoils only itself.
        21 if hostile => (
            b"{\"t\": 1e400, \"n\": {\"v\": 7}}".to_vec(),
            [None, Some(7.0), None, None],
        ),
        // Two huge numbers in a row: their sum is infinite.
        3 | 4 if hostile => (
            b"{\"t\": 1e-400, \"n\": {\"v\": 1e308}}".to_vec(),
            [None, Some(1e308), None, None],
        ),
        // jsonb refuses the whole document.
        7 if hostile => (b"{\"t\": 2, \"k\": \"\\u0000\"}".to_vec(), [None; 4]),
        _ => {
            let v = (i % 5) as f64;
            let payload = format!("{{\"t\": {t}, \"n\": {{\"v\": {v}}}, \"s\": \"x{i}\"}}");
            (payload.into_bytes(), [Some(t), Some(v), None, None])
        }
    }
}

/// Publishes readings `range` in bursts of 10 with a pause between bursts,
/// so that a few-millisecond bucket holds several readings and some
/// buckets are empty.
async fn publish(device: &TestDevice, range: std::ops::Range<u64>) {
    let topic = format!("devices/{DEVICE}/readings");
    for i in range {
        device
            .client
            .publish(&topic, QoS::AtLeastOnce, false, reading(i).0)
            .await
            .unwrap();
        if i % 10 == 9 {
            // Spacing the data out, not waiting for anything.
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
}

fn micros(reading: &Reading) -> u64 {
    let t = reading.received_at.as_ref().unwrap();
    t.seconds as u64 * 1_000_000 + t.nanos as u64 / 1_000
}

fn timestamp(micros: u64) -> Timestamp {
    Timestamp::from(SystemTime::UNIX_EPOCH + Duration::from_micros(micros))
}

/// Every reading of the device in `[start, end)`, through ListReadings.
async fn list_range(client: &DeviceHubClient<Channel>, start: u64, end: u64) -> Vec<Reading> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = ListReadingsRequest {
            device_id: DEVICE.into(),
            start_time: Some(timestamp(start)),
            end_time: Some(timestamp(end)),
            oldest_first: true,
            page_size: 1000,
            page_token,
            ..Default::default()
        };
        let page = client.clone().list_readings(request).await.unwrap();
        let page = page.into_inner();
        all.extend(page.readings);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// What the buckets must be: computed here from the readings
/// ListReadings returned and what [`reading`] put in each (`index`: the
/// reading's number as published, by sequence number).
fn expected(
    readings: &[Reading],
    index: &HashMap<u64, u64>,
    field: usize,
    bucket: u64,
) -> Vec<Bucket> {
    let mut buckets: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for r in readings {
        let i = index[&r.seq];
        assert_eq!(
            r.payload,
            reading(i).0,
            "reading {i} is where it was published"
        );
        if let Some(value) = reading(i).1[field] {
            let at = micros(r);
            buckets.entry(at - at % bucket).or_default().push(value);
        }
    }
    buckets
        .into_iter()
        .map(|(start, values)| {
            let sum = values.iter().fold(0.0, |sum, v| sum + v);
            Bucket {
                start_time: Some(timestamp(start)),
                count: values.len() as i64,
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                mean: sum / values.len() as f64,
                sum,
                first: values[0],
                last: values[values.len() - 1],
            }
        })
        .collect()
}

fn request(fields: &[&str], start: u64, end: u64, bucket: u64) -> AggregateReadingsRequest {
    AggregateReadingsRequest {
        device_id: DEVICE.into(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
        start_time: Some(timestamp(start)),
        end_time: Some(timestamp(end)),
        bucket: Some(prost_types::Duration {
            seconds: (bucket / 1_000_000) as i64,
            nanos: (bucket % 1_000_000 * 1_000) as i32,
        }),
    }
}

/// AggregateReadings over `[start, end)` equals what the readings
/// ListReadings returns make, figure by figure. Sums (and so means) are
/// compared to 1e-12 relative: the store adds in the order it aggregates,
/// which a sort may change, and float addition is not associative.
/// Returns how many buckets the first field's series held.
async fn assert_same(
    client: &DeviceHubClient<Channel>,
    index: &HashMap<u64, u64>,
    start: u64,
    end: u64,
    bucket: u64,
) -> usize {
    let readings = list_range(client, start, end).await;
    let response = client
        .clone()
        .aggregate_readings(request(&FIELDS, start, end, bucket))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.series.len(), FIELDS.len());
    for (n, (series, field)) in response.series.iter().zip(FIELDS).enumerate() {
        assert_eq!(series.field, field);
        let want = expected(&readings, index, n, bucket);
        let got = &series.buckets;
        assert_eq!(got.len(), want.len(), "{field}: {got:?}\nwant {want:?}");
        for (g, w) in got.iter().zip(&want) {
            let close =
                |a: f64, b: f64| a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0);
            assert!(
                g.start_time == w.start_time
                    && (g.count, g.min, g.max, g.first, g.last)
                        == (w.count, w.min, w.max, w.first, w.last)
                    && close(g.sum, w.sum)
                    && close(g.mean, w.mean),
                "{field}: got {g:?}\nwant {w:?}"
            );
        }
    }
    assert!(response.series[2].buckets.is_empty(), "strings never count");
    response.series[0].buckets.len()
}

/// The device's readings' times, oldest first, and each one's number as
/// published by its sequence number (one publisher, QoS 1: they arrive in
/// the order sent).
async fn times(client: &DeviceHubClient<Channel>) -> (Vec<u64>, HashMap<u64, u64>) {
    let all = list_range(client, 0, 4_102_444_800_000_000).await;
    let index = all
        .iter()
        .enumerate()
        .map(|(i, r)| (r.seq, i as u64))
        .collect();
    (all.iter().map(micros).collect(), index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_from_memory_match_list_readings() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker, "agg-device", None).await;
    publish(&device, 0..300).await;
    let (times, index) = eventually("300 readings buffered", || async {
        let (times, index) = times(&client).await;
        (times.len() == 300).then_some((times, index))
    })
    .await;
    let (first, last) = (times[0], times[299]);

    // Edges off the bucket grid, at several widths; empty buckets between
    // the bursts are left out.
    for bucket in [1_000, 3_000, 7_000, 1_000_000] {
        let start = first + 1_500;
        let buckets = assert_same(&client, &index, start, last, bucket).await;
        assert!(buckets > 0);
    }
    let spread = last / 1_000 - first / 1_000 + 1;
    let buckets = assert_same(&client, &index, first, last + 1, 1_000).await as u64;
    assert!(
        buckets < spread,
        "1 ms buckets between the bursts are empty and left out: {buckets} of {spread}"
    );
    // Bounds between two microseconds select what ListReadings selects.
    let (start, end) = (times[10], times[20]);
    let half = |micros: u64| {
        let mut t = timestamp(micros);
        t.nanos += 500;
        Some(t)
    };
    let mut between = request(&["/n/v"], 0, 0, 1_000_000);
    (between.start_time, between.end_time) = (half(start), half(end));
    let listed = client
        .clone()
        .list_readings(ListReadingsRequest {
            device_id: DEVICE.into(),
            start_time: half(start),
            end_time: half(end),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .readings;
    let counted: usize = listed
        .iter()
        .filter(|r| reading(index[&r.seq]).1[1].is_some())
        .count();
    let response = client
        .clone()
        .aggregate_readings(between)
        .await
        .unwrap()
        .into_inner();
    let total: i64 = response.series[0].buckets.iter().map(|b| b.count).sum();
    assert_eq!(total as usize, counted, "{listed:?}");

    // The first bucket keeps its aligned start before `start_time`.
    let start = first + 1;
    let response = client
        .clone()
        .aggregate_readings(request(&["/t"], start, last + 1, 1_000_000))
        .await
        .unwrap()
        .into_inner();
    let head = &response.series[0].buckets[0];
    assert_eq!(head.start_time, Some(timestamp(start - start % 1_000_000)));

    // No readings in the range, or no such device: empty series.
    let empty = client
        .clone()
        .aggregate_readings(request(&FIELDS, last + 10, last + 20, 1_000))
        .await
        .unwrap()
        .into_inner();
    assert!(empty.series.iter().all(|s| s.buckets.is_empty()));
    assert_eq!(empty.series.len(), FIELDS.len());
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_from_the_store_and_across_memory_match_list_readings() {
    let pg = Postgres::start();
    let broker = embedded_broker();
    // Memory holds the newest 100 readings; the rest only the store has.
    let args = ["--store-url", &pg.url(), "--buffer-max-readings", "100"];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker, "agg-device", None).await;
    publish(&device, 0..600).await;
    let (times, index) = eventually("600 readings stored", || async {
        let (times, index) = times(&client).await;
        (times.len() == 600).then_some((times, index))
    })
    .await;
    let in_memory = |client: &DeviceHubClient<Channel>| {
        let mut client = client.clone();
        async move {
            let request = devicehub::proto::GetDeviceRequest {
                device_id: DEVICE.into(),
            };
            let device = client.get_device(request).await.unwrap().into_inner();
            device.device.unwrap().readings_buffered
        }
    };
    assert!(in_memory(&client).await <= 100);

    // Only the store, before the hostile payloads: its fast statement
    // answers (the database logs no error: nothing fell back).
    let hostile = times[HOSTILE_FROM as usize];
    let errors = || pg.log().matches("ERROR:").count();
    for bucket in [1_000, 5_000, 1_000_000] {
        assert!(assert_same(&client, &index, times[0] + 700, hostile, bucket).await > 0);
    }
    assert_eq!(errors(), 0, "{}", pg.log());
    // Only the store, the hostile ones: the fast statement fails on them
    // and the safe one answers. Then all 600, across both at once.
    for bucket in [1_000, 5_000, 1_000_000] {
        assert!(assert_same(&client, &index, hostile, times[450], bucket).await > 0);
        assert!(assert_same(&client, &index, times[0], times[599] + 1, bucket).await > 0);
    }
    assert!(
        errors() > 0,
        "the fast statement failed on a hostile payload"
    );
    // Only memory: the newest 50.
    let newest = times[550];
    assert!(assert_same(&client, &index, newest, times[599] + 1, 2_000).await > 0);

    // With the store down, memory's range is still served; one that
    // reaches into the store is UNAVAILABLE, and says so.
    pg.stop();
    assert!(assert_same(&client, &index, newest, times[599] + 1, 2_000).await > 0);
    let status = client
        .clone()
        .aggregate_readings(request(&FIELDS, times[0], times[599] + 1, 1_000))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("store"), "{status:?}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_validated_and_scoped() {
    let broker = embedded_broker();
    let dir = TempDir::new("aggregate-scopes");
    let signer = Signer::es256();
    let keys = dir.write("keys.pem", &signer.public_pem);
    let service = TestService::start_ready(config(&broker, &["--auth-jwt-key", &keys])).await;
    let mut client = service.client().await;
    let token = signer.sign(&claims("tester", "readings:read:agg-*", 3600));
    let day = 86_400_000_000;
    let ok = request(&["/t"], 1_000 * day, 1_001 * day, 60_000_000);
    client
        .aggregate_readings(authed(&token, ok.clone()))
        .await
        .unwrap();

    let invalid = |change: fn(&mut AggregateReadingsRequest), field: &str, words: &str| {
        let mut request = ok.clone();
        change(&mut request);
        (request, field.to_string(), words.to_string())
    };
    let cases = [
        invalid(|r| r.device_id.clear(), "device_id", "required"),
        invalid(|r| r.device_id = "a/b".into(), "device_id", ""),
        invalid(|r| r.fields.clear(), "fields", "required"),
        invalid(|r| r.fields = vec!["/t".into(); 17], "fields", "at most 16"),
        invalid(|r| r.fields = vec!["t".into()], "fields", "JSON Pointer"),
        invalid(|r| r.fields.push("/a~2".into()), "fields", "[1]"),
        invalid(|r| r.start_time = None, "start_time", "required"),
        invalid(|r| r.end_time = None, "end_time", "required"),
        invalid(|r| r.end_time = r.start_time, "end_time", "later"),
        invalid(|r| r.bucket = None, "bucket", "required"),
        invalid(
            |r| {
                r.bucket = Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 999_000,
                })
            },
            "bucket",
            "1 ms",
        ),
        invalid(
            |r| {
                r.bucket = Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500,
                })
            },
            "bucket",
            "whole microseconds",
        ),
        invalid(
            |r| {
                r.bucket = Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                })
            },
            "bucket",
            "",
        ),
        // A day at 8.64 s buckets is exactly 10 000; one more is refused.
        invalid(
            |r| {
                r.bucket = Some(prost_types::Duration {
                    seconds: 8,
                    nanos: 639_999_000,
                })
            },
            "bucket",
            "at most 10000",
        ),
    ];
    for (request, field, words) in cases {
        let status = client
            .aggregate_readings(authed(&token, request.clone()))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
        assert!(
            status.message().contains(&field) && status.message().contains(&words),
            "{request:?}: {status:?}"
        );
    }
    let mut limit = ok.clone();
    limit.bucket = Some(prost_types::Duration {
        seconds: 8,
        nanos: 640_000_000,
    });
    let response = client
        .aggregate_readings(authed(&token, limit))
        .await
        .unwrap()
        .into_inner();
    assert!(response.series[0].buckets.is_empty(), "no readings then");

    // Another device than the scope names, and no token.
    let mut other = ok.clone();
    other.device_id = "pump-1".into();
    let status = client
        .aggregate_readings(authed(&token, other))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("readings:read"), "{status:?}");
    let status = client.aggregate_readings(ok).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    service.stop().await;
}
