//! Limits a hostile or broken client cannot get around: watchers per client,
//! the size of request metadata, and a shutdown that does not wait for ever.

mod common;

use std::time::Duration;

use common::*;
use devicehub::proto::{
    device_hub_client::DeviceHubClient, ListReadingsRequest, SendCommandRequest,
    WatchReadingsRequest,
};
use tonic::{transport::Channel, Code, Request};

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

    // Another connection still gets its watchers.
    let mut other = connect(&service).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_call_that_would_take_a_minute() {
    let broker = embedded_broker();
    let args = ["--shutdown-timeout-secs", "1"];
    let service = TestService::start_ready(config(&broker, &args)).await;
    let mut client = connect(&service).await;
    let _device =
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
    let mut device = _device;
    device.next_message().await;
    // `stop` waits at most PATIENCE (20 s): far less than the call's minute.
    service.stop().await;
    call.abort();
}
