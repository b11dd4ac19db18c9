//! Limits a hostile or broken client cannot get around: watchers per client,
//! the size of request metadata, and a shutdown that does not wait for ever.

use crate::common;

use std::time::Duration;

use common::*;
use devicehub::proto::{
    device_hub_client::DeviceHubClient, ListReadingsRequest, SendCommandRequest,
    WatchReadingsRequest,
};
use tonic::{transport::Channel, Code, Request};

/// A client connecting from `source`, one of the loopback addresses.
async fn connect_from(service: &TestService, source: &str) -> DeviceHubClient<Channel> {
    let channel = Channel::from_shared(service.url())
        .unwrap()
        .local_address(Some(source.parse().unwrap()))
        .connect()
        .await
        .unwrap();
    DeviceHubClient::new(channel)
}

async fn connect(service: &TestService) -> DeviceHubClient<Channel> {
    // A channel of its own: a connection of its own.
    let channel = Channel::from_shared(service.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    DeviceHubClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_watcher() {
    let broker = embedded_broker();
    let args = ["--max-watchers-per-client", "2", "--max-watchers", "10"];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let mut greedy = connect(&service).await;
    let first = greedy
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap();
    let _second = greedy
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap();
    let status = greedy
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-watchers-per-client"),
        "{status:?}"
    );

    // Another client (another address: without auth a client is its
    // remote IP) still gets its watchers.
    let mut other = connect_from(&service, "127.0.0.2").await;
    other
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap();

    // A watch that ends gives its slot back.
    drop(first);
    eventually("the slot to come back", || {
        let mut greedy = greedy.clone();
        async move {
            greedy
                .watch_readings(WatchReadingsRequest::default())
                .await
                .ok()
        }
    })
    .await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_metadata_is_refused() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let with_metadata = |bytes: usize| {
        let mut request = Request::new(ListReadingsRequest::default());
        let value = "x".repeat(bytes).parse().unwrap();
        request.metadata_mut().insert("x-padding", value);
        request
    };
    // Room for a large token (hyper alone would refuse this with HTTP 431)...
    let mut client = connect(&service).await;
    client.list_readings(with_metadata(32 << 10)).await.unwrap();
    // ...but a bound all the same.
    let mut client = connect(&service).await;
    let status = client
        .list_readings(with_metadata(96 << 10))
        .await
        .unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    service.stop().await;
}

/// SIGTERM with a call in flight that waits a minute for a reply: shutdown
/// waits `--shutdown-timeout` (1 s) for it, no less (calls get their
/// chance to end) and not much more; then the process closes the call's
/// connection and exits cleanly, and the call ends with it. The binary,
/// not the service in-process: the connections outlive `run` in a test's
/// runtime, while in a process of its own they end with it, as they do for
/// an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_call_that_would_take_a_minute() {
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
    let broker = embedded_broker();
    let args = ["--shutdown-timeout", "1s"];
    let (mut serve, addr, _metrics) = serve_with_metrics(&broker, &args).await;
    let mut client = DeviceHubClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut device =
        TestDevice::connect(&broker, "silent-device", Some("devices/silent/commands")).await;
    // Waits up to a minute for a reply that never comes.
    let call = tokio::spawn(async move {
        client
            .send_command(SendCommandRequest {
                device_id: "silent".into(),
                command: "PING".into(),
                reply_timeout: Some(Duration::from_secs(60).try_into().unwrap()),
                ..Default::default()
            })
            .await
    });
    // The command is out (the device got it) before shutdown begins.
    device.next_message().await;
    let signalled = std::time::Instant::now();
    let exit = terminate(&mut serve).await;
    let took = signalled.elapsed();
    assert!(exit.success(), "the service stops cleanly: {exit}");
    assert!(
        took >= SHUTDOWN_TIMEOUT,
        "shutdown waited for the call for --shutdown-timeout: took {took:?}"
    );
    // What follows the deadline (the MQTT link's goodbye, the exit) takes
    // milliseconds; the slack is for a loaded machine, and still well under
    // the default timeout (10 s) and the call's minute.
    assert!(
        took < SHUTDOWN_TIMEOUT + Duration::from_secs(4),
        "shutdown took {took:?}, --shutdown-timeout is {SHUTDOWN_TIMEOUT:?}"
    );
    let status = within("the call to end with the process", call)
        .await
        .unwrap()
        .expect_err("no reply came");
    // No status from the service (it sent none): the connection closed
    // under the call, which tonic reports as UNKNOWN "transport error"
    // (gRPC's C++ and Go clients as UNAVAILABLE).
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(status.message().contains("transport error"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_over_the_size_limit_are_not_stored() {
    let broker = embedded_broker();
    let args = ["--max-reading-bytes", "1000"];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let client = service.client().await;
    let device = TestDevice::connect(&broker, "device-large", None).await;
    device
        .publish("devices/big/readings", vec![b'x'; 1001])
        .await;
    device
        .publish("devices/big/readings", vec![b'y'; 1000])
        .await;
    let stored = list_until(
        "the reading at the limit",
        &client,
        ListReadingsRequest::default(),
        |r| (!r.is_empty()).then_some(r),
    )
    .await;
    assert_eq!(stored.len(), 1, "the one over the limit is not stored");
    assert_eq!(stored[0].payload.len(), 1000);
    service.stop().await;
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// The binary, a watcher that keeps up (every reading it gets is encoded
/// and shared through the window), one that has stopped reading, and 300
/// readings of 1 MB: the process's memory stays within the bounds the
/// worst-case formula of docs/api.md gives for them, where the window alone used
/// to grow by every reading (8 192 of them, bounded by count only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_with_large_readings_and_watchers() {
    const MIB: u64 = 1 << 20;
    let broker = embedded_broker();
    let (broker_url, buffer) = (broker.to_string(), (64 * MIB).to_string());
    let args = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--mqtt-url",
        &broker_url,
    ];
    let args = [&args[..], &["--buffer-max-bytes", &buffer]].concat();
    let (mut serve, mut log) = spawn_devicehub(&args, &[]);
    let pid = serve.id().unwrap();
    let addr = logged_addr(&mut log, "gRPC listening", "addr=").await;
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let channel = eventually("the service", || {
        let url = format!("http://{addr}");
        async move { Channel::from_shared(url).unwrap().connect().await.ok() }
    })
    .await;
    let mut client = DeviceHubClient::new(channel.clone()).max_decoding_message_size(8 << 20);
    eventually("a subscribed service", || {
        let mut client = client.clone();
        async move {
            // A command goes out only while the link is up and subscribed.
            let mut request = Request::new(SendCommandRequest {
                device_id: "probe".into(),
                command: "PING".into(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(2));
            client.send_command(request).await.ok()
        }
    })
    .await;
    let baseline = rss(pid);

    let _stalled = client
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap();
    // Keeps up as well as it can; gaps (the buffer holds only 64 of these)
    // are told in-band.
    let mut reader = client
        .watch_readings(WatchReadingsRequest {
            gap_policy: devicehub::proto::GapPolicy::Notify.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let count: u64 = 300;
    let reading = tokio::spawn(async move {
        use devicehub::proto::watch_readings_response::Event;
        loop {
            let message = reader.message().await.unwrap().unwrap();
            if let Some(Event::Reading(r)) = message.event {
                if r.payload[..8] == (count - 1).to_be_bytes() {
                    return;
                }
            }
        }
    });
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = tokio::spawn({
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let device = TestDevice::connect(&broker, "device-megabytes", None).await;
    for i in 0..count {
        let mut payload = vec![b'.'; 1_000_000];
        payload[..8].copy_from_slice(&i.to_be_bytes());
        device.publish("devices/mega/readings", payload).await;
    }
    within("the watcher to read every reading", reading)
        .await
        .unwrap();
    sampler.abort();
    let grown = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(baseline);
    // docs/api.md's formula for this run: --buffer-max-bytes (64) + the
    // encoded window (64) + 2 watchers × 8 × 1 MiB (16) + 10 MQTT packets
    // of 1 MB (10) = 154 MiB, and the allocator's share (glibc keeps freed
    // megabyte blocks in per-thread arenas; 184-224 MiB were measured over
    // runs of 200 readings, and it does not grow with more). Without the
    // window's byte bound and the batches' byte budget the process grew
    // with every reading: 375 MiB for 200 of them.
    let bound = 280 * MIB;
    assert!(
        grown <= bound,
        "grew by {} MiB, bound {} MiB",
        grown / MIB,
        bound / MIB
    );
    eprintln!(
        "memory grew by {} MiB (bound {} MiB)",
        grown / MIB,
        bound / MIB
    );
    let _ = serve.start_kill();
    let _ = serve.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_command_slot() {
    let broker = embedded_broker();
    let args = ["--max-commands-per-client", "2"];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let mut device =
        TestDevice::connect(&broker, "device-slow", Some("devices/slow/commands")).await;
    let waiting = |device_id: &str| SendCommandRequest {
        device_id: device_id.into(),
        command: "PING".into(),
        reply_timeout: Some(Duration::from_secs(30).try_into().unwrap()),
        ..Default::default()
    };
    // Two commands wait for replies that do not come (yet).
    let greedy = connect(&service).await;
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let mut greedy = greedy.clone();
            let request = waiting("slow");
            tokio::spawn(async move { greedy.send_command(request).await })
        })
        .collect();
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..2 {
            let envelope: serde_json::Value =
                serde_json::from_slice(&device.next_message().await.payload).unwrap();
            ids.push(envelope["id"].as_str().unwrap().to_owned());
        }
        ids
    };
    let status = greedy
        .clone()
        .send_command(waiting("slow"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-commands-per-client"),
        "{status:?}"
    );
    // Another client (another address) is not held up.
    let mut other = connect_from(&service, "127.0.0.2").await;
    other
        .send_command(SendCommandRequest {
            device_id: "slow".into(),
            command: "PING".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Replies end the two calls and free their slots.
    for id in ids {
        let reply = serde_json::json!({"id": id, "status": "ok"});
        device
            .publish("devices/slow/replies", reply.to_string())
            .await;
    }
    for call in calls {
        within("a replied command", call).await.unwrap().unwrap();
    }
    let mut request = waiting("slow");
    request.reply_timeout = None;
    greedy.clone().send_command(request).await.unwrap();
    service.stop().await;
}

/// 1 000 ListReadings of 1 000 readings of 1 kB (1 MB each) on one
/// connection whose client never reads (a raw HTTP/2 client keeping the
/// default 64 KiB windows): the service holds at most
/// its connection's share of --max-response-bytes-in-flight, ends the
/// others with RESOURCE_EXHAUSTED (counted), serves other clients meanwhile,
/// and its memory stays within the bound. When the client goes, its charge
/// comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_nobody_reads_are_held_under_one_budget() {
    use prost::Message;
    const MIB: u64 = 1 << 20;
    const CALLS: usize = 1000;
    let broker = embedded_broker();
    let budget = (16 * MIB).to_string();
    let extra = [
        "--max-response-bytes-in-flight",
        &budget,
        "--max-streams-per-connection",
        "1000",
    ];
    let (mut serve, addr, metrics) = serve_with_metrics(&broker, &extra).await;
    let pid = serve.id().unwrap();
    let client = eventually("the service", || {
        let url = format!("http://{addr}");
        async move { DeviceHubClient::connect(url).await.ok() }
    })
    .await;
    let device = TestDevice::connect(&broker, "device-kilobytes", None).await;
    for i in 0..1000 {
        let mut payload = vec![b'.'; 1000];
        payload[..4].copy_from_slice(format!("{i:04}").as_bytes());
        device.publish("devices/kilo/readings", payload).await;
    }
    let request = ListReadingsRequest {
        device_id: "kilo".into(),
        page_size: 1000,
        ..Default::default()
    };
    eventually("1 000 readings listed", || {
        let (mut client, request) = (client.clone(), request.clone());
        async move {
            let page = client.list_readings(request).await.ok()?.into_inner();
            (page.readings.len() == 1000).then_some(())
        }
    })
    .await;
    let baseline = rss(pid);

    // The client that never reads.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut body = vec![0u8];
    let message = request.encode_to_vec();
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(&message);
    let body = bytes::Bytes::from(body);
    let mut responses = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let mut h2 = within("a stream", h2.clone().ready()).await.unwrap();
        let request =
            http::Request::post(format!("http://{addr}/devicehub.v1.DeviceHub/ListReadings"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
        let (response, mut send) = h2.send_request(request, false).unwrap();
        send.send_data(body.clone(), true).unwrap();
        // Kept, never polled for data: dropping it would reset the stream.
        responses.push((response, send));
    }
    let text = eventually("most calls refused", || async {
        let text = scrape(&metrics).await;
        let refused = sample(&text, "devicehub_responses_refused_total")?;
        (refused >= (CALLS - 20) as f64).then_some(text)
    })
    .await;
    // One connection owes at most its share, 8 MiB here (two of the
    // largest responses; a sixteenth of a larger budget).
    let in_flight = sample(&text, "devicehub_response_bytes_in_flight").unwrap();
    assert!(in_flight <= (8 * MIB) as f64, "{in_flight} bytes in flight");
    let grown = rss(pid).saturating_sub(baseline);
    // The budget, what h2 keeps per stream beyond the window (a response
    // in hand each), and the allocator's share; without the budget the
    // 1 000 responses took about 1 GB.
    let bound = 16 * MIB + 64 * MIB;
    assert!(grown <= bound, "grew by {} MiB", grown / MIB);
    eprintln!(
        "memory grew by {} MiB (bound {} MiB)",
        grown / MIB,
        bound / MIB
    );

    // Meanwhile another client is served: the stuck one holds only its
    // share. Once it is gone, everything it held comes back.
    let page = client
        .clone()
        .list_readings(request.clone())
        .await
        .expect("a page for another client while one holds its share")
        .into_inner();
    assert_eq!(page.readings.len(), 1000);
    drop(responses);
    drop(h2);
    connection.abort();
    eventually("the stuck client's charge given back", || async {
        let text = scrape(&metrics).await;
        (sample(&text, "devicehub_response_bytes_in_flight") == Some(0.0)).then_some(())
    })
    .await;
    let page = client
        .clone()
        .list_readings(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.readings.len(), 1000);
    let _ = serve.start_kill();
    let _ = serve.wait().await;
}
