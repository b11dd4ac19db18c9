//! The PostgreSQL store, with real parts: a throwaway PostgreSQL cluster
//! (Debian's package, `tests/it/common/postgres.rs`), Mosquitto, and the
//! service in-process or as the `devicehub` binary (to SIGKILL it).

use crate::common;

use std::time::{Duration, SystemTime};

use common::{postgres::Postgres, *};
use devicehub::proto::{
    device_hub_client::DeviceHubClient, watch_readings_response::Event as WatchEvent, Device,
    DeviceStatus, GapPolicy, ListDevicesRequest, ListReadingsRequest, Reading,
    WatchReadingsRequest,
};
use rumqttc::QoS;
use tonic::{transport::Channel, Code};
use tonic_health::pb::health_check_response::ServingStatus;

const DEVICES: u64 = 10;

fn count(pg: &Postgres, sql_where: &str) -> u64 {
    pg.psql(&format!("SELECT count(*) FROM readings {sql_where}"))
        .parse()
        .unwrap()
}

async fn wait_for_rows(pg: &Postgres, rows: u64) {
    eventually(&format!("{rows} rows in the table"), || async {
        (count(pg, "") >= rows).then_some(())
    })
    .await
}

/// Every page of `request` (its page token replaced as it goes).
async fn list_pages(
    client: &DeviceHubClient<Channel>,
    mut request: ListReadingsRequest,
) -> Vec<Reading> {
    let mut all = Vec::new();
    loop {
        let page = client
            .clone()
            .list_readings(request.clone())
            .await
            .expect("a page")
            .into_inner();
        all.extend(page.readings);
        if page.next_page_token.is_empty() {
            return all;
        }
        request.page_token = page.next_page_token;
    }
}

/// The first `n` readings a watch from `after_seq` delivers (a gap fails).
async fn watch_n(
    client: &DeviceHubClient<Channel>,
    request: WatchReadingsRequest,
    n: usize,
) -> Vec<Reading> {
    let mut stream = client
        .clone()
        .watch_readings(request)
        .await
        .expect("watch starts")
        .into_inner();
    let mut readings = Vec::with_capacity(n);
    while readings.len() < n {
        let message = within("a watched reading", stream.message())
            .await
            .expect("stream ok")
            .expect("stream open");
        match message.event {
            Some(WatchEvent::Reading(reading)) => readings.push(reading),
            other => panic!("expected a reading, got {other:?}"),
        }
    }
    readings
}

async fn list_devices(client: &DeviceHubClient<Channel>) -> Vec<Device> {
    client
        .clone()
        .list_devices(ListDevicesRequest::default())
        .await
        .expect("devices")
        .into_inner()
        .devices
}

/// Every reading listed, oldest first, in pages of `page_size` (0: the
/// default size).
async fn list_everything(client: &DeviceHubClient<Channel>, page_size: i32) -> Vec<Reading> {
    let request = ListReadingsRequest {
        oldest_first: true,
        page_size,
        ..Default::default()
    };
    list_pages(client, request).await
}

/// `readings` are the payloads `indices`, in order, numbered without holes.
fn assert_indices(readings: &[Reading], indices: std::ops::Range<u64>) {
    let got: Vec<u64> = readings.iter().map(index_of).collect();
    assert_eq!(
        got,
        indices.collect::<Vec<_>>(),
        "all of them, in order, once"
    );
    assert_contiguous(readings);
}

fn assert_contiguous(readings: &[Reading]) {
    for pair in readings.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "numbers without holes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_a_restart_and_resumes_with_the_same_numbers() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = ["--store-url", &pg.url()];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-restart", None).await;
    publish_spread(&device, 0, 300, DEVICES).await.unwrap();
    device.publish("devices/d1/status", "online").await;
    device
        .publish("devices/d2/status", r#"{"status": "offline"}"#)
        .await;
    wait_for_rows(&pg, 302).await;
    let devices_before = list_devices(&client).await;
    assert_eq!(devices_before.len() as u64, DEVICES);
    let before = list_everything(&client, 0).await;
    assert_eq!(before.len(), 302);
    service.stop().await;

    // A new process: memory is empty, the table is not.
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let after = list_everything(&client, 7).await;
    assert_eq!(after, before, "the same readings, numbers and times");
    assert_contiguous(&after);
    // The device list as it was (from the devices table, not from history),
    // except what is in memory now: nothing.
    let devices_after = list_devices(&client).await;
    assert_eq!(devices_after.len(), devices_before.len());
    for (was, is) in devices_before.iter().zip(&devices_after) {
        assert_eq!(is.readings_buffered, 0);
        let was = Device {
            readings_buffered: 0,
            ..was.clone()
        };
        assert_eq!(*is, was);
    }
    let d1 = &devices_after[1];
    assert_eq!(d1.status(), DeviceStatus::Online);
    assert_eq!(devices_after[2].status(), DeviceStatus::Offline);
    assert_eq!(devices_after[0].status(), DeviceStatus::Unknown);
    assert_eq!(
        index_of(d1.last_reading.as_ref().unwrap()) % DEVICES,
        1,
        "its newest reading, not its status message"
    );

    // Resume from the middle: the rest of the old readings from the table,
    // then new ones live, numbered on from the old ones.
    let resume_from = before[149].seq;
    let watch = {
        let client = client.clone();
        tokio::spawn(async move {
            let request = WatchReadingsRequest {
                after_seq: Some(resume_from),
                ..Default::default()
            };
            watch_n(&client, request, 252).await
        })
    };
    publish_spread(&device, 300, 100, DEVICES).await.unwrap();
    let watched = within("the resumed watch", watch).await.unwrap();
    assert_eq!(watched[..152], before[150..], "replayed from the table");
    let indices: Vec<u64> = watched
        .iter()
        .filter(|r| r.topic.ends_with("/readings"))
        .map(index_of)
        .collect();
    assert_eq!(indices, (150..400).collect::<Vec<_>>());
    assert_contiguous(&watched);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_resumes_beyond_the_memory_window() {
    const TOTAL: u64 = 50_000;
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = ["--store-url", &pg.url(), "--buffer-max-readings", "1000"];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-history", None).await;
    publish_spread(&device, 0, TOTAL, DEVICES).await.unwrap();
    wait_for_rows(&pg, TOTAL).await;
    let buffered = client
        .clone()
        .list_readings(ListReadingsRequest {
            oldest_first: true,
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(index_of(&buffered.readings[0]), 0, "the table's oldest");

    // Everything, both orders, pages of 1 000 and of 333.
    let oldest_first = list_everything(&client, 1000).await;
    assert_indices(&oldest_first, 0..TOTAL);
    let mut newest_first = list_pages(
        &client,
        ListReadingsRequest {
            page_size: 333,
            ..Default::default()
        },
    )
    .await;
    newest_first.reverse();
    assert_eq!(newest_first, oldest_first);

    // One device, both orders.
    let d3: Vec<Reading> = oldest_first
        .iter()
        .filter(|r| r.device_id == "d3")
        .cloned()
        .collect();
    assert_eq!(d3.len() as u64, TOTAL / DEVICES);
    let request = ListReadingsRequest {
        device_id: "d3".into(),
        page_size: 500,
        ..Default::default()
    };
    let mut listed = list_pages(&client, request.clone()).await;
    listed.reverse();
    assert_eq!(listed, d3);
    let listed = list_pages(
        &client,
        ListReadingsRequest {
            oldest_first: true,
            ..request
        },
    )
    .await;
    assert_eq!(listed, d3);

    // A time range, both orders, with a topic filter too.
    let (start, end) = (
        oldest_first[10_000].received_at.unwrap(),
        oldest_first[20_000].received_at.unwrap(),
    );
    let in_range: Vec<Reading> = oldest_first
        .iter()
        .filter(|r| {
            let t = r.received_at.as_ref().unwrap();
            (t.seconds, t.nanos) >= (start.seconds, start.nanos)
                && (t.seconds, t.nanos) < (end.seconds, end.nanos)
        })
        .cloned()
        .collect();
    // Readings of one network read share their time: the range may take
    // in a few more before #10 000 and leave out a few before #20 000.
    assert!(
        (9_900..=10_100).contains(&in_range.len()),
        "{}",
        in_range.len()
    );
    let request = ListReadingsRequest {
        start_time: Some(start),
        end_time: Some(end),
        page_size: 1000,
        oldest_first: true,
        ..Default::default()
    };
    assert_eq!(list_pages(&client, request.clone()).await, in_range);
    let mut listed = list_pages(
        &client,
        ListReadingsRequest {
            oldest_first: false,
            ..request.clone()
        },
    )
    .await;
    listed.reverse();
    assert_eq!(listed, in_range);
    let d7: Vec<Reading> = in_range
        .iter()
        .filter(|r| r.device_id == "d7")
        .cloned()
        .collect();
    let listed = list_pages(
        &client,
        ListReadingsRequest {
            topic_filter: "devices/d7/#".into(),
            ..request
        },
    )
    .await;
    assert_eq!(listed, d7);

    // Resume from before the first number: all of it, in order, the seam
    // between table and memory included.
    let request = WatchReadingsRequest {
        after_seq: Some(oldest_first[0].seq - 1),
        ..Default::default()
    };
    let watched = watch_n(&client, request, TOTAL as usize).await;
    assert_eq!(watched, oldest_first);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_readings_beyond_memory_are_read_back_in_bounded_fetches() {
    // 60 readings of 200 kB: a fetch from the table stops at 4 MiB, so
    // pages and the replay take several fetches each, and must go on after
    // every one of them.
    const TOTAL: u64 = 60;
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = ["--store-url", &pg.url(), "--buffer-max-readings", "5"];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-large", None).await;
    for i in 0..TOTAL {
        let payload = format!("{i}:{}", "x".repeat(200_000));
        device.publish("devices/d1/readings", payload).await;
    }
    wait_for_rows(&pg, TOTAL).await;
    let listed = list_everything(&client, 0).await;
    assert_indices(&listed, 0..TOTAL);
    let request = WatchReadingsRequest {
        after_seq: Some(0),
        ..Default::default()
    };
    let watched = watch_n(&client, request, TOTAL as usize).await;
    assert_eq!(watched, listed, "the replay: every one, in order");
    service.stop().await;
}

/// Mosquitto as the burst tests need it: the default in-flight window of
/// 20 unacknowledged messages per client, a queue deep enough to hold a
/// burst while devicehub is away.
fn burst_broker() -> Mosquitto {
    let port = closed_port().port;
    let conf = format!(
        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
         max_inflight_messages 20\nmax_queued_messages 100000\n"
    );
    Mosquitto::start_config(
        common::tempdir::TempDir::new("mosquitto"),
        &conf,
        port,
        false,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_loses_no_acknowledged_reading() {
    const TOTAL: u64 = 10_000;
    let pg = Postgres::start();
    let broker = burst_broker();
    let url = pg.url();
    let mqtt_url = format!("mqtt://127.0.0.1:{}", broker.url.port);
    let args = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--mqtt-url",
        &mqtt_url,
        "--mqtt-client-id",
        "devicehub-store-kill",
        "--mqtt-persistent-session",
        "--store-url",
        &url,
    ];
    let (mut first, mut log) = spawn_devicehub(&args, &[]);
    logged_addr(&mut log, "subscribed to readings", "filters=").await;
    let device = TestDevice::connect(&broker.url, "device-burst", None).await;
    let burst = publish_spread(&device, 0, TOTAL, DEVICES);
    wait_for_rows(&pg, 2_000).await;
    first.kill().await.unwrap();
    let at_kill = count(&pg, "");
    assert!(at_kill < TOTAL, "killed mid-burst ({at_kill} stored)");

    let (_second, mut log) = spawn_devicehub(&args, &[]);
    let grpc = logged_addr(&mut log, "gRPC listening", "addr=").await;
    burst.await.unwrap();
    every_payload_stored(&pg, TOTAL).await;
    // Duplicates only of readings committed but not acknowledged when the
    // process died: the newest ones it committed, delivered again by the
    // broker first thing after the restart.
    let duplicates = count(&pg, "") - TOTAL;
    let copies = pg.psql(
        "SELECT coalesce(string_agg(min::text || ' ' || max::text, ',' ORDER BY min), '') \
         FROM (SELECT min(seq), max(seq) FROM readings GROUP BY payload HAVING count(*) > 1) d",
    );
    let copies: Vec<(u64, u64)> = copies
        .split(',')
        .filter(|c| !c.is_empty())
        .map(|c| {
            let (a, b) = c.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(
        copies.len() as u64,
        duplicates,
        "each duplicated once at most"
    );
    let oldest: u64 = pg.psql("SELECT min(seq) FROM readings").parse().unwrap();
    let last_before_kill = oldest + at_kill - 1;
    for (i, (first_copy, second_copy)) in copies.iter().enumerate() {
        let k = copies.len() - i; // counted back from the kill
        assert_eq!(*first_copy, last_before_kill + 1 - k as u64, "{copies:?}");
        assert_eq!(*second_copy, last_before_kill + 1 + i as u64, "{copies:?}");
    }
    eprintln!("{duplicates} readings committed but not acknowledged at the kill were stored twice");
    let payloads =
        pg.psql("SELECT string_agg(DISTINCT convert_from(payload, 'UTF8'), ',') FROM readings");
    let mut indices: Vec<u64> = payloads.split(',').map(|p| p.parse().unwrap()).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..TOTAL).collect::<Vec<_>>());

    // And the service lists them all, numbered without holes.
    let client = DeviceHubClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let all = list_everything(&client, 1000).await;
    assert_eq!(all.len() as u64, TOTAL + duplicates);
    assert_contiguous(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_holds_readings_back_and_health_follows() {
    const TOTAL: u64 = 3_000;
    let pg = Postgres::start();
    let broker = burst_broker();
    let args = [
        "--store-url",
        &pg.url(),
        "--mqtt-client-id",
        "devicehub-store-outage",
        "--mqtt-persistent-session",
        // Memory holds the newest 100: the oldest page needs the table.
        "--buffer-max-readings",
        "100",
    ];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-outage", None).await;
    // A steady stream, so readings arrive before and during the outage.
    let client_mqtt = device.client.clone();
    let mut stream = tokio::spawn(async move {
        for i in 0..TOTAL {
            let topic = format!("devices/d{}/readings", i % DEVICES);
            client_mqtt
                .publish(topic, QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    wait_for_rows(&pg, 300).await;
    pg.stop();
    service.wait_for_health(ServingStatus::NotServing).await;
    // Pages that need the table answer UNAVAILABLE meanwhile, not wrongly
    // (nor from memory, which lacks them).
    let oldest = client
        .clone()
        .list_readings(ListReadingsRequest {
            oldest_first: true,
            ..Default::default()
        })
        .await;
    let status = match oldest {
        Err(status) => status,
        Ok(page) => panic!(
            "the oldest page answered while the database is down: {} readings",
            page.get_ref().readings.len()
        ),
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The database stays down until the whole stream is out: what came
    // after the stop waits, unacknowledged, for it to return.
    within("the stream published during the outage", &mut stream)
        .await
        .unwrap();
    pg.start_again();
    service.wait_for_health(ServingStatus::Serving).await;
    wait_for_rows(&pg, TOTAL).await;
    let all = list_everything(&client, 1000).await;
    assert_indices(&all, 0..TOTAL);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_what_is_older_and_nothing_else() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = [
        "--store-url",
        &pg.url(),
        "--store-retention",
        "4s",
        "--buffer-max-readings",
        "10",
    ];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-retention", None).await;
    publish_spread(&device, 0, 100, DEVICES).await.unwrap();
    wait_for_rows(&pg, 100).await;
    let old = list_everything(&client, 0).await;
    // The newer readings must be younger than the cutoff when the older
    // ones go: received once the newest older one is two seconds old (by
    // its received_at, the time retention compares), with a four-second
    // retention.
    let newest_old = old
        .iter()
        .map(|r| SystemTime::try_from(r.received_at.unwrap()).unwrap())
        .max()
        .unwrap();
    eventually("the older readings two seconds old", || async {
        let age = newest_old.elapsed().unwrap_or_default();
        (age >= Duration::from_secs(2)).then_some(())
    })
    .await;
    publish_spread(&device, 100, 100, DEVICES).await.unwrap();
    wait_for_rows(&pg, 200).await;
    eventually("retention to delete the older readings", || async {
        (count(&pg, "") == 100).then_some(())
    })
    .await;
    let kept = pg.psql("SELECT min(convert_from(payload, 'UTF8')::int), max(convert_from(payload, 'UTF8')::int) FROM readings");
    assert_eq!(kept, "100|199", "exactly the newer hundred are left");

    // Pages start at the oldest kept; a watch from before it is told what
    // it missed, and OUT_OF_RANGE without the gap policy.
    let listed = list_everything(&client, 0).await;
    assert_eq!(index_of(&listed[0]), 100);
    assert_eq!(listed.len(), 100);
    let mut stream = client
        .clone()
        .watch_readings(WatchReadingsRequest {
            after_seq: Some(old[0].seq - 1),
            gap_policy: GapPolicy::Notify as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = within("the gap", stream.message()).await.unwrap().unwrap();
    match first.event {
        Some(WatchEvent::Gap(gap)) => {
            assert_eq!((gap.first_seq, gap.last_seq), (old[0].seq, old[99].seq));
        }
        other => panic!("expected the gap, got {other:?}"),
    }
    let next = within("a reading", stream.message())
        .await
        .unwrap()
        .unwrap();
    match next.event {
        Some(WatchEvent::Reading(reading)) => assert_eq!(reading, listed[0]),
        other => panic!("expected a reading, got {other:?}"),
    }
    let refused = client
        .clone()
        .watch_readings(WatchReadingsRequest {
            after_seq: Some(old[0].seq - 1),
            ..Default::default()
        })
        .await
        .expect_err("a cursor past the retention");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_reached_fails_startup_without_its_password() {
    let url = format!(
        "postgres://devicehub:hunter2-secret@127.0.0.1:{}/x",
        closed_port().port
    );
    let args = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--embedded-mqtt-addr",
        "127.0.0.1:0",
    ];
    let stderr = startup_error(&args, &[("DEVICEHUB_STORE_URL", &url)]).await;
    assert!(
        stderr.contains("cannot reach the PostgreSQL store"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args(["serve", "--help"])
        .env("DEVICEHUB_STORE_URL", "postgres://u:hunter2-secret@h/db")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--store-url"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args(["serve", "--store-retention", "30d"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--store-url"), "{stderr}");
}

/// Whether psql holds `readings` in ACCESS EXCLUSIVE mode.
const READINGS_LOCKED: &str =
    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
     WHERE c.relname = 'readings' AND l.mode = 'AccessExclusiveLock' AND l.granted";

/// Locks `readings` from psql for `seconds` (every statement on it waits:
/// reads and commits alike) and returns once the lock is held.
async fn lock_readings(pg: &Postgres, seconds: u32) -> std::process::Child {
    let lock = pg.psql_spawn(&format!(
        "BEGIN; LOCK TABLE readings IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({seconds}); COMMIT"
    ));
    eventually("psql locking readings", || async {
        (pg.psql(READINGS_LOCKED) == "1").then_some(())
    })
    .await;
    lock
}

/// The oldest page, which memory (100 readings) cannot serve.
fn oldest_page() -> ListReadingsRequest {
    ListReadingsRequest {
        oldest_first: true,
        page_size: 10,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_blocked_in_the_table_leave_the_writer_its_connections() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = ["--store-url", &pg.url(), "--buffer-max-readings", "100"];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-locked", None).await;
    publish_spread(&device, 0, 1_000, DEVICES).await.unwrap();
    wait_for_rows(&pg, 1_000).await;

    let mut lock = lock_readings(&pg, 8).await;
    let locked_at = tokio::time::Instant::now();
    // More reads than there are read connections, each waiting on the lock
    // (the default read timeout, 10 s, outlasts it) or for a connection.
    let reads: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .clone()
                    .list_readings(oldest_page())
                    .await
                    .map(|_| ())
                    .map_err(|status| status.code())
            })
        })
        .collect();
    // The writer's idle probe (every second) still gets its connection:
    // with one pool the blocked reads held them all, the probe timed out
    // after 3 s and health turned NOT_SERVING.
    while locked_at.elapsed() < Duration::from_millis(6_500) {
        assert_eq!(
            service.health().await,
            ServingStatus::Serving,
            "health while reads wait on the lock ({:?} in)",
            locked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut answered = 0;
    for read in reads {
        match read.await.unwrap() {
            Ok(()) => answered += 1,
            // No read connection within the acquire timeout.
            Err(Code::Unavailable) => {}
            Err(code) => panic!("a blocked read answered {code:?}"),
        }
    }
    assert!(
        answered > 0,
        "reads holding a connection answer once it ends"
    );
    assert!(lock.wait().unwrap().success());
    publish_spread(&device, 1_000, 1_000, DEVICES)
        .await
        .unwrap();
    every_payload_stored(&pg, 2_000).await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_past_the_read_timeout_answers_unavailable_and_the_writer_goes_on() {
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = [
        "--store-url",
        &pg.url(),
        "--buffer-max-readings",
        "100",
        "--store-read-timeout",
        "300ms",
    ];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-timeout", None).await;
    publish_spread(&device, 0, 1_000, DEVICES).await.unwrap();
    wait_for_rows(&pg, 1_000).await;

    let mut lock = lock_readings(&pg, 4).await;
    // Readings arrive meanwhile: their commit waits for the lock.
    let during = publish_spread(&device, 1_000, 500, DEVICES);
    let started = tokio::time::Instant::now();
    let status = client
        .clone()
        .list_readings(oldest_page())
        .await
        .expect_err("the table is locked");
    let took = started.elapsed();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    assert!(
        !status.message().contains("statement") && !status.message().contains("cancel"),
        "PostgreSQL's text stays in the log: {status:?}"
    );
    // A replay from the table too.
    let mut stream = client
        .clone()
        .watch_readings(WatchReadingsRequest {
            after_seq: Some(0),
            ..Default::default()
        })
        .await
        .expect("watch starts")
        .into_inner();
    let status = within("the replay's answer", stream.message())
        .await
        .expect_err("the table is locked");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // Memory still serves what it holds.
    let newest = client
        .clone()
        .list_readings(ListReadingsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("the newest page, from memory")
        .into_inner();
    assert_eq!(newest.readings.len(), 1);

    assert!(lock.wait().unwrap().success());
    during.await.unwrap();
    every_payload_stored(&pg, 1_500).await;
    assert_eq!(service.health().await, ServingStatus::Serving);
    let all = list_everything(&client, 1_000).await;
    assert_indices(&all, 0..1_500);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_page_looks_at_a_bounded_number_of_rows() {
    // 150 000 rows written straight into the table (the service numbers
    // from the counter, moved past them), none on the filter's topic: a
    // page stops after about 100 000 rows with a token to go on.
    const ROWS: u64 = 150_000;
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = ["--store-url", &pg.url(), "--buffer-max-readings", "100"];
    TestService::start_ready(config(&broker.url, &args))
        .await
        .stop()
        .await;
    pg.psql(&format!(
        "INSERT INTO readings (seq, device_id, topic, payload, qos, retained, received_at, kind) \
         SELECT s.next_seq + g, 'd' || (g % 10), 'devices/d' || (g % 10) || '/readings', \
                convert_to(g::text, 'UTF8'), 1, false, now(), 0 \
         FROM devicehub_sequence s, generate_series(0, {ROWS} - 1) g; \
         UPDATE devicehub_sequence SET next_seq = next_seq + {ROWS}"
    ));
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    for oldest_first in [true, false] {
        let mut request = ListReadingsRequest {
            oldest_first,
            // Any device (so no device index narrows it), no such topic.
            topic_filter: "devices/+/nothing".into(),
            ..Default::default()
        };
        let mut pages = 0;
        loop {
            let page = client
                .clone()
                .list_readings(request.clone())
                .await
                .expect("a page")
                .into_inner();
            pages += 1;
            assert!(page.readings.is_empty());
            if page.next_page_token.is_empty() {
                break;
            }
            request.page_token = page.next_page_token;
        }
        assert_eq!(pages, 2, "oldest first: {oldest_first}");
    }
    // All of it is there, through the same bound.
    let all = list_everything(&client, 1_000).await;
    assert_indices(&all, 0..ROWS);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_for_one_device_reads_that_devices_rows_only() {
    const TOTAL: u64 = 10_000;
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = ["--store-url", &pg.url(), "--buffer-max-readings", "100"];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-replay", None).await;
    publish_spread(&device, 0, TOTAL, DEVICES).await.unwrap();
    wait_for_rows(&pg, TOTAL).await;
    let d3: Vec<u64> = pg
        .psql("SELECT string_agg(convert_from(payload, 'UTF8'), ',' ORDER BY seq) FROM readings WHERE device_id = 'd3'")
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(d3.len() as u64, TOTAL / DEVICES);
    let first: u64 = pg.psql("SELECT min(seq) FROM readings").parse().unwrap();
    pg.psql("SELECT pg_stat_reset()");
    let request = WatchReadingsRequest {
        after_seq: Some(first - 1),
        device_id: "d3".into(),
        ..Default::default()
    };
    let watched = watch_n(&client, request, d3.len()).await;
    assert_eq!(watched.iter().map(index_of).collect::<Vec<_>>(), d3);
    assert!(watched.iter().all(|r| r.device_id == "d3"));
    // The replay walked the (device_id, seq) index, not every device's rows
    // by number (statistics reach the view within a second or so).
    let tuples = |index: &str| -> u64 {
        pg.psql(&format!(
            "SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes \
             WHERE indexrelname = '{index}'"
        ))
        .parse()
        .unwrap()
    };
    eventually(
        "the replay's rows read through the device index",
        || async { (tuples("readings_device_seq") >= TOTAL / DEVICES - 100).then_some(()) },
    )
    .await;
    let by_number = tuples("readings_pkey");
    assert!(by_number < TOTAL / 2, "{by_number} rows read by number");
    service.stop().await;
}

/// Every listed device, page after page.
async fn list_all_devices(client: &DeviceHubClient<Channel>) -> Vec<Device> {
    let mut request = ListDevicesRequest {
        page_size: 1_000,
        ..Default::default()
    };
    let mut all = Vec::new();
    loop {
        let page = client
            .clone()
            .list_devices(request.clone())
            .await
            .expect("devices")
            .into_inner();
        all.extend(page.devices);
        if page.next_page_token.is_empty() {
            return all;
        }
        request.page_token = page.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_devices_are_restored_in_batches_within_the_budget() {
    // 5 000 devices, one reading each: five restore batches.
    const DEVICE_COUNT: u64 = 5_000;
    let pg = Postgres::start();
    let broker = Mosquitto::start();
    let args = ["--store-url", &pg.url(), "--buffer-max-readings", "100"];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let device = TestDevice::connect(&broker.url, "device-many", None).await;
    publish_spread(&device, 0, DEVICE_COUNT, DEVICE_COUNT)
        .await
        .unwrap();
    wait_for_rows(&pg, DEVICE_COUNT).await;
    service.stop().await;

    // Statements logged from here on: the restore's batches show in them.
    pg.psql("ALTER SYSTEM SET log_statement = 'all'");
    pg.psql("SELECT pg_reload_conf()");
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let batches = pg.log().matches("FROM devices d LEFT JOIN").count();
    assert!(batches >= 5, "{batches} statements read the device list");
    pg.psql("ALTER SYSTEM RESET log_statement");
    pg.psql("SELECT pg_reload_conf()");
    let devices = list_all_devices(&service.client().await).await;
    let mut ids: Vec<String> = devices.iter().map(|d| d.device_id.clone()).collect();
    ids.sort();
    let mut want: Vec<String> = (0..DEVICE_COUNT).map(|i| format!("d{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "every device, once");
    for device in &devices {
        let reading = device.last_reading.as_ref().expect("its newest reading");
        assert_eq!(format!("d{}", index_of(reading)), device.device_id);
    }
    service.stop().await;

    // A budget for 1 000 payload bytes: all listed, about that many kept.
    let mut small = args.to_vec();
    small.extend(["--devices-max-bytes", "1000"]);
    let service = TestService::start_ready(config(&broker.url, &small)).await;
    let devices = list_all_devices(&service.client().await).await;
    assert_eq!(devices.len() as u64, DEVICE_COUNT);
    let kept: usize = devices
        .iter()
        .filter_map(|d| d.last_reading.as_ref())
        .map(|r| r.payload.len())
        .sum();
    assert!((900..=1_000).contains(&kept), "{kept} bytes kept");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_store_scans_during_a_burst_lose_nothing() {
    const HISTORY: u64 = 5_000;
    const BURST: u64 = 20_000;
    const SCANNERS: usize = 100;
    let pg = Postgres::start();
    let broker = burst_broker();
    let args = [
        "--store-url",
        &pg.url(),
        "--buffer-max-readings",
        "100",
        "--mqtt-client-id",
        "devicehub-store-scans",
        "--mqtt-persistent-session",
    ];
    let service = TestService::start_ready(config(&broker.url, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker.url, "device-scans", None).await;
    publish_spread(&device, 0, HISTORY, DEVICES).await.unwrap();
    wait_for_rows(&pg, HISTORY).await;

    let burst = publish_spread(&device, HISTORY, BURST, DEVICES);
    let done = tokio_util::sync::CancellationToken::new();
    // Each scanner walks the oldest pages (the table's: memory holds 100
    // readings) over and over, a device's or everyone's.
    let scanners: Vec<_> = (0..SCANNERS)
        .map(|i| {
            let client = client.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let (mut answered, mut refused) = (0u64, 0u64);
                let mut request = ListReadingsRequest {
                    oldest_first: true,
                    page_size: 200,
                    device_id: match i % 2 {
                        0 => String::new(),
                        _ => format!("d{}", i % DEVICES as usize),
                    },
                    ..Default::default()
                };
                while !done.is_cancelled() {
                    match client.clone().list_readings(request.clone()).await {
                        Ok(page) => {
                            answered += 1;
                            let token = page.into_inner().next_page_token;
                            // Back to the oldest page after five.
                            request.page_token = match answered % 5 {
                                0 => String::new(),
                                _ => token,
                            };
                        }
                        Err(status) if status.code() == Code::Unavailable => refused += 1,
                        Err(status) => panic!("a scan failed: {status:?}"),
                    }
                }
                (answered, refused)
            })
        })
        .collect();
    // Health stays SERVING throughout: the writer has its own connections.
    let deadline = tokio::time::Instant::now() + PATIENCE * 6;
    while !burst.is_finished() || count(&pg, "") < HISTORY + BURST {
        assert_eq!(service.health().await, ServingStatus::Serving);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the burst is not stored after {:?}",
            PATIENCE * 6
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.cancel();
    let (mut answered, mut refused) = (0, 0);
    for scanner in scanners {
        let (a, r) = scanner.await.unwrap();
        answered += a;
        refused += r;
    }
    eprintln!("{answered} pages answered, {refused} UNAVAILABLE (no read connection in time)");
    assert!(answered >= SCANNERS as u64, "the scans ran");
    burst.await.unwrap();
    every_payload_stored(&pg, HISTORY + BURST).await;
    assert_eq!(service.health().await, ServingStatus::Serving);
    service.stop().await;
}
