//! Streams that never lose data silently: resume cursors, gaps, slow
//! consumers, watcher limits and hostile payloads, against the embedded
//! broker. (Broker and service restarts are in tests/it/mosquitto.rs.)

use crate::common;

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use common::*;
use devicehub::proto::{
    device_hub_client::DeviceHubClient, watch_readings_response::Event as WatchEvent, GapPolicy,
    ListReadingsRequest, Reading, WatchReadingsRequest,
};
use tonic::{transport::Channel, Code, Streaming};

async fn wait_for_count(
    client: &DeviceHubClient<Channel>,
    device_id: &str,
    count: usize,
) -> Vec<Reading> {
    eventually(&format!("{count} readings of {device_id}"), || async move {
        let all = list_all(client, device_id).await;
        (all.len() >= count).then_some(all)
    })
    .await
}

async fn watch(
    client: &mut DeviceHubClient<Channel>,
    request: WatchReadingsRequest,
) -> Streaming<devicehub::proto::WatchReadingsResponse> {
    client.watch_readings(request).await.unwrap().into_inner()
}

async fn next_event(stream: &mut Streaming<devicehub::proto::WatchReadingsResponse>) -> WatchEvent {
    within("a watch event", stream.message())
        .await
        .unwrap()
        .expect("stream open")
        .event
        .expect("an event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_replays_then_goes_live_with_no_gap_and_no_duplicate() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    let device = TestDevice::connect(&broker, "device-resume", None).await;
    for i in 0..50 {
        device.publish("devices/d1/readings", i.to_string()).await;
    }
    let first = wait_for_count(&client, "d1", 50).await;

    // Resume after the 20th reading while the device keeps publishing: the
    // seam between replay and live must be invisible.
    let publishing = publish_indices(&device, "devices/d1/readings", 50..400);
    let mut stream = watch(
        &mut client,
        WatchReadingsRequest {
            device_id: "d1".into(),
            after_seq: Some(first[19].seq),
            ..Default::default()
        },
    )
    .await;
    let mut got = Vec::new();
    while got.len() < 380 {
        let WatchEvent::Reading(reading) = next_event(&mut stream).await else {
            panic!("unexpected gap")
        };
        got.push(index_of(&reading));
    }
    assert_eq!(got, (20..400).collect::<Vec<_>>());
    publishing.await.unwrap();

    // after_seq 0: everything buffered.
    let mut all = watch(
        &mut client,
        WatchReadingsRequest {
            after_seq: Some(0),
            ..Default::default()
        },
    )
    .await;
    let WatchEvent::Reading(oldest) = next_event(&mut all).await else {
        panic!("unexpected gap")
    };
    assert_eq!(index_of(&oldest), 0);

    // A cursor from the future is refused.
    let status = client
        .watch_readings(WatchReadingsRequest {
            after_seq: Some(u64::MAX - 1),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("after_seq"), "{status:?}");
    let status = client
        .watch_readings(WatchReadingsRequest {
            gap_policy: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("gap_policy"), "{status:?}");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cursor_fails_or_reports_the_exact_gap() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &["--buffer-max-readings", "10"])).await;
    let mut client = service.client().await;
    let device = TestDevice::connect(&broker, "device-stale", None).await;
    device.publish("devices/d1/readings", "0").await;
    let oldest_then = wait_for_count(&client, "d1", 1).await[0].seq;
    for i in 1..30 {
        device.publish("devices/d1/readings", i.to_string()).await;
    }
    let buffered = eventually("the buffer to hold readings 20 to 29", || {
        let client = &client;
        async move {
            let all = list_all(client, "d1").await;
            (all.first().map(index_of) == Some(20) && all.len() == 10).then_some(all)
        }
    })
    .await;

    let status = client
        .watch_readings(WatchReadingsRequest {
            after_seq: Some(oldest_then),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("the oldest buffered is {}", buffered[0].seq)),
        "{status:?}"
    );

    let mut stream = watch(
        &mut client,
        WatchReadingsRequest {
            after_seq: Some(oldest_then),
            gap_policy: GapPolicy::Notify.into(),
            ..Default::default()
        },
    )
    .await;
    let WatchEvent::Gap(gap) = next_event(&mut stream).await else {
        panic!("expected a gap first")
    };
    assert_eq!(
        (gap.first_seq, gap.last_seq),
        (oldest_then + 1, buffered[0].seq - 1)
    );
    for want in &buffered {
        let WatchEvent::Reading(reading) = next_event(&mut stream).await else {
            panic!("a second gap")
        };
        assert_eq!(&reading, want);
    }
    service.stop().await;
}

/// A gap reported in-band moves the resume point past it: the position the
/// shutdown status gives is the end of the gap (the watcher's device has
/// nothing after it), so a client resuming there is not told of it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_band_gap_moves_the_resume_point_past_it() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &["--buffer-max-readings", "10"])).await;
    let mut client = service.client().await;
    let device = TestDevice::connect(&broker, "device-gap-resume", None).await;
    device.publish("devices/d1/readings", "0").await;
    let cursor = wait_for_count(&client, "d1", 1).await[0].seq;
    for i in 1..30 {
        device.publish("devices/d2/readings", i.to_string()).await;
    }
    eventually("d1's reading evicted", || {
        let client = &client;
        async move { list_all(client, "d1").await.is_empty().then_some(()) }
    })
    .await;
    let mut stream = watch(
        &mut client,
        WatchReadingsRequest {
            device_id: "d1".into(),
            after_seq: Some(cursor),
            gap_policy: GapPolicy::Notify.into(),
            ..Default::default()
        },
    )
    .await;
    let WatchEvent::Gap(gap) = next_event(&mut stream).await else {
        panic!("expected a gap first")
    };
    assert!(gap.last_seq > cursor, "{gap:?}");
    service.stop().await;
    let status = within("the shutdown status", stream.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .ends_with(&format!("resume after sequence number {}", gap.last_seq)),
        "{status:?}"
    );
}

/// Collects one watcher's stream in a background task.
fn collect(
    mut stream: Streaming<devicehub::proto::WatchReadingsResponse>,
) -> Arc<Mutex<Vec<WatchEvent>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    tokio::spawn(async move {
        while let Ok(Some(message)) = stream.message().await {
            sink.lock().unwrap().push(message.event.unwrap());
        }
    });
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_gets_gaps_while_fast_watchers_and_ingestion_get_everything() {
    let broker = embedded_broker();
    let service =
        TestService::start_ready(config(&broker, &["--buffer-max-readings", "300"])).await;
    let mut client = service.client().await;
    let notify = || WatchReadingsRequest {
        gap_policy: GapPolicy::Notify.into(),
        ..Default::default()
    };
    let fast: Vec<_> = [
        collect(watch(&mut client, notify()).await),
        collect(watch(&mut client, notify()).await),
    ]
    .into();
    // On a connection of its own: HTTP/2 flow control would otherwise let
    // the stalled stream hold back the others on the client side.
    let mut slow = watch(&mut TestService::client(&service).await, notify()).await;

    // Large enough readings that the stalled stream's transport windows
    // (a few MiB) fill up, and the buffer (300 readings) moves past it.
    let device = TestDevice::connect(&broker, "device-slow", None).await;
    let pad = "p".repeat(1000);
    let (rounds, per_round) = (40, 250);
    for round in 0..rounds {
        for i in 0..per_round {
            device
                .publish(
                    "devices/d1/readings",
                    format!("{}:{pad}", round * per_round + i),
                )
                .await;
        }
        // Pace by the fast watchers, so only the stalled one falls behind.
        let want = (round + 1) * per_round;
        eventually("the fast watchers to keep up", || {
            let fast = fast.clone();
            async move {
                fast.iter()
                    .all(|events| events.lock().unwrap().len() >= want)
                    .then_some(())
            }
        })
        .await;
    }
    let total = rounds * per_round;
    for events in &fast {
        let events = events.lock().unwrap();
        let indices: Vec<u64> = events
            .iter()
            .map(|e| match e {
                WatchEvent::Reading(r) => index_of(r),
                WatchEvent::Gap(g) => panic!("a fast watcher got a gap: {g:?}"),
            })
            .collect();
        assert_eq!(indices, (0..total as u64).collect::<Vec<_>>());
    }

    // The slow watcher now reads: every reading either arrives, or lies in a
    // gap it was told about, in order and once.
    let newest = list_all(&client, "d1").await.last().unwrap().seq;
    let mut covered = BTreeSet::new();
    let mut gaps = 0;
    let mut last = 0;
    while last < newest {
        match next_event(&mut slow).await {
            WatchEvent::Reading(reading) => {
                assert!(reading.seq > last, "in order");
                covered.insert(reading.seq);
                last = reading.seq;
            }
            WatchEvent::Gap(gap) => {
                assert!(gap.first_seq > last && gap.last_seq >= gap.first_seq);
                gaps += 1;
                covered.extend(gap.first_seq..=gap.last_seq);
                last = gap.last_seq;
            }
        }
    }
    assert!(gaps > 0, "the stalled watcher should have fallen behind");
    let first = *covered.first().unwrap();
    assert_eq!(
        covered.len() as u64,
        newest - first + 1,
        "no reading unaccounted for"
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_limit_is_resource_exhausted_and_slots_come_back() {
    let broker = embedded_broker();
    // One connection opens them all: the per-client and per-connection
    // limits are out of the way.
    let args = [
        "--max-watchers",
        "1000",
        "--max-watchers-per-client",
        "1000",
        "--max-streams-per-connection",
        "1024",
    ];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let mut client = service.client().await;

    // Many watchers open and close, concurrently, several times over.
    for _ in 0..3 {
        let opened = futures_join(
            1000,
            |mut c| async move {
                c.watch_readings(WatchReadingsRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
            },
            &client,
        )
        .await;
        let status = client
            .watch_readings(WatchReadingsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        drop(opened);
        eventually("watcher slots to be released", || {
            let mut client = client.clone();
            async move {
                client
                    .watch_readings(WatchReadingsRequest::default())
                    .await
                    .ok()
            }
        })
        .await;
    }
    // Still responsive.
    client
        .list_readings(ListReadingsRequest::default())
        .await
        .unwrap();
    service.stop().await;
}

/// Runs `n` calls of `f` concurrently on clones of `client`.
async fn futures_join<T, F, Fut>(n: usize, f: F, client: &DeviceHubClient<Channel>) -> Vec<T>
where
    F: Fn(DeviceHubClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(f(client.clone()))).collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(within("a concurrent call", task).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_kept_raw_and_nothing_stalls() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let mut client = service.client().await;
    let mut stream = watch(&mut client, WatchReadingsRequest::default()).await;
    let device = TestDevice::connect(&broker, "device-hostile", None).await;

    let mut random = vec![0u8; 4096];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for byte in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    let deep_array = "[".repeat(100_000) + &"]".repeat(100_000);
    let deep_object = r#"{"a":"#.repeat(100_000) + "1" + &"}".repeat(100_000);
    let payloads: Vec<(Vec<u8>, bool)> = vec![
        (random, false),
        (b"\xc3\x28 invalid utf-8".to_vec(), false),
        (Vec::new(), false),
        (vec![b'x'; 256 << 10], false),
        (vec![0u8; 1 << 20], false),
        (deep_array.into_bytes(), false),
        (deep_object.into_bytes(), false),
        (b"1e999".to_vec(), false),
        (b"123456789012345678901234567890".to_vec(), true),
        (br#"{"v": NaN}"#.to_vec(), false),
        (br#"{"v": "NaN", "w": "-Infinity"}"#.to_vec(), true),
        (br#""\ud800""#.to_vec(), false),
        (
            format!("{{\"big\": \"{}\"}}", "y".repeat(300 << 10)).into_bytes(),
            true,
        ),
    ];
    for (payload, _) in &payloads {
        device
            .publish("devices/hostile/readings", payload.clone())
            .await;
    }
    for (payload, is_json) in &payloads {
        let WatchEvent::Reading(reading) = next_event(&mut stream).await else {
            panic!("unexpected gap")
        };
        assert_eq!(&reading.payload[..], &payload[..], "kept byte for byte");
        assert_eq!(
            reading.json.is_some(),
            *is_json,
            "json for {:?}",
            String::from_utf8_lossy(&payload[..payload.len().min(40)])
        );
    }
    let listed = list_all(&client, "hostile").await;
    assert_eq!(listed.len(), payloads.len());
    service.stop().await;
}

/// Every page of `request` from the first, following tokens until one is
/// empty, as the grpcurl and Python clients do: the pages' readings.
async fn follow_pages(
    client: &DeviceHubClient<Channel>,
    request: ListReadingsRequest,
) -> Vec<Vec<Reading>> {
    let mut client = client.clone();
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_readings(ListReadingsRequest {
                page_token,
                ..request.clone()
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.readings);
        if page.next_page_token.is_empty() {
            return pages;
        }
        page_token = page.next_page_token;
        assert!(pages.len() < 1000, "tokens that never end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_matching_few_readings_page_in_bounded_steps_to_the_end() {
    // More readings than one call looks at (4 096), three of them command
    // replies (buffered like readings): listing by a filter that matches
    // few or none returns short or empty pages with tokens, and following
    // them finds exactly the matching readings, once, in order. The topic
    // filters have `+` at the device level: a literal device there would
    // be served from the device index instead of a scan.
    const TOTAL: u64 = 10_000;
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker, "device-scan", None).await;
    let replies_at = [10, 5_000, TOTAL - 1];
    for i in 0..TOTAL {
        let kind = match replies_at.contains(&i) {
            true => "replies",
            false => "readings",
        };
        device
            .publish(&format!("devices/d{}/{kind}", i % 2), i.to_string())
            .await;
    }
    list_until(
        "every reading buffered",
        &client,
        ListReadingsRequest {
            page_size: 1,
            ..Default::default()
        },
        |readings| (readings.first().map(index_of) == Some(TOTAL - 1)).then_some(()),
    )
    .await;

    for oldest_first in [true, false] {
        let in_order = |mut indices: Vec<u64>| {
            if !oldest_first {
                indices.reverse();
            }
            indices
        };
        for (request, want) in [
            (
                ListReadingsRequest {
                    topic_filter: "devices/+/nothing".into(),
                    ..Default::default()
                },
                vec![],
            ),
            (
                ListReadingsRequest {
                    topic_filter: "devices/+/replies".into(),
                    ..Default::default()
                },
                in_order(replies_at.to_vec()),
            ),
            (
                ListReadingsRequest {
                    topic_filter: "devices/+/replies".into(),
                    page_size: 1,
                    ..Default::default()
                },
                in_order(replies_at.to_vec()),
            ),
            // Through the device index: d0's 5 000 readings are over the
            // bound too.
            (
                ListReadingsRequest {
                    device_id: "d0".into(),
                    topic_filter: "devices/+/replies".into(),
                    ..Default::default()
                },
                in_order(vec![10, 5_000]),
            ),
            (
                ListReadingsRequest {
                    device_id: "d1".into(),
                    topic_filter: "devices/+/nothing".into(),
                    ..Default::default()
                },
                vec![],
            ),
        ] {
            let what = format!("{request:?} oldest_first {oldest_first}");
            let pages = follow_pages(
                &client,
                ListReadingsRequest {
                    oldest_first,
                    ..request
                },
            )
            .await;
            assert!(pages.len() > 1, "the first page is cut short: {what}");
            let got: Vec<u64> = pages.concat().iter().map(index_of).collect();
            assert_eq!(got, want, "{what}");
        }
    }
    service.stop().await;
}
