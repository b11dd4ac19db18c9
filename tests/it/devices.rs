//! ListDevices and GetDevice: devices appear with their newest reading,
//! page in id order by prefix, and follow their connection status from
//! retained `online` messages and `offline` last wills, through the
//! embedded broker and Mosquitto, with devices killed and reconnected.

use crate::common;

use std::time::SystemTime;

use common::*;
use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, watch_readings_response::Event, Device, DeviceStatus,
        DeviceView, GetDeviceRequest, ListDevicesRequest, SendCommandRequest, WatchReadingsRequest,
    },
};
use rumqttc::{LastWill, MqttOptions, QoS};
use tonic::{transport::Channel, Code};

/// A device that says `online` (retained) and leaves `offline` as its last
/// will, as the issue's devices (and the simulator) do.
async fn device_with_will(broker: &BrokerUrl, id: &str) -> TestDevice {
    let mut options = MqttOptions::new(id, &broker.host, broker.port);
    let status = format!("devices/{id}/status");
    options.set_last_will(LastWill::new(&status, "offline", QoS::AtLeastOnce, true));
    let device = TestDevice::connect_options(options, None).await;
    device
        .client
        .publish(&status, QoS::AtLeastOnce, true, "online")
        .await
        .unwrap();
    device
}

async fn get(client: &DeviceHubClient<Channel>, id: &str) -> Result<Device, tonic::Status> {
    let response = client
        .clone()
        .get_device(GetDeviceRequest {
            device_id: id.into(),
        })
        .await?;
    Ok(response.into_inner().device.expect("a device"))
}

/// Waits until `id` is known with `status`, and returns it.
async fn wait_status(client: &DeviceHubClient<Channel>, id: &str, status: DeviceStatus) -> Device {
    eventually(&format!("{id} {status:?}"), || async {
        get(client, id).await.ok().filter(|d| d.status() == status)
    })
    .await
}

fn ids(devices: &[Device]) -> Vec<&str> {
    devices.iter().map(|d| d.device_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_list_with_newest_reading_and_status_on_the_embedded_broker() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &["--buffer-max-readings", "20"])).await;
    let client = service.client().await;
    let mut statuses = client
        .clone()
        .watch_readings(WatchReadingsRequest {
            topic_filter: "devices/+/status".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let pump = device_with_will(&broker, "pump-1").await;
    pump.publish("devices/pump-1/readings", "1").await;
    pump.publish("devices/pump-1/readings", r#"{"rpm": 2}"#)
        .await;
    let other = TestDevice::connect(&broker, "others", None).await;
    other.publish("devices/pump-2/readings", "x").await;
    other.publish("devices/fan-1/readings", "y").await;
    other.publish("elsewhere/no-device", "z").await;

    let all = eventually("three devices listed", || async {
        let page = client
            .clone()
            .list_devices(ListDevicesRequest::default())
            .await
            .unwrap()
            .into_inner();
        (page.devices.len() == 3 && page.devices.iter().all(|d| d.last_reading.is_some()))
            .then_some(page)
    })
    .await;
    assert_eq!(ids(&all.devices), ["fan-1", "pump-1", "pump-2"]);
    assert!(all.next_page_token.is_empty());

    // The basic view: the same devices, their last readings without
    // contents (seq, device and time only); an unknown view is refused.
    let basic = client
        .clone()
        .list_devices(ListDevicesRequest {
            view: DeviceView::Basic as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&basic.devices), ids(&all.devices));
    for (basic, full) in basic.devices.iter().zip(&all.devices) {
        let (b, f) = (
            basic.last_reading.as_ref().unwrap(),
            full.last_reading.as_ref().unwrap(),
        );
        assert_eq!(
            (b.seq, &b.device_id, &b.received_at),
            (f.seq, &f.device_id, &f.received_at)
        );
        assert!(
            b.payload.is_empty() && b.json.is_none() && b.topic.is_empty(),
            "{b:?}"
        );
        assert_eq!(
            (basic.status, basic.last_seen, basic.readings_buffered),
            (full.status, full.last_seen, full.readings_buffered)
        );
    }
    let status = client
        .clone()
        .list_devices(ListDevicesRequest {
            view: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("view"), "{status:?}");

    // pump-1: its newest reading (decoded JSON too), times, status.
    let device = wait_status(&client, "pump-1", DeviceStatus::Online).await;
    let reading = device.last_reading.as_ref().unwrap();
    assert_eq!(reading.payload.as_ref(), br#"{"rpm": 2}"#);
    assert_eq!(reading.device_id, "pump-1");
    assert!(reading.json.is_some());
    let first_seen = SystemTime::try_from(device.first_seen.unwrap()).unwrap();
    let last_seen = SystemTime::try_from(device.last_seen.unwrap()).unwrap();
    assert!(first_seen <= last_seen);
    assert!(device.status_changed_at.is_some());
    assert_eq!(device.readings_buffered, 3, "online, and two readings");
    let fan = get(&client, "fan-1").await.unwrap();
    assert_eq!(fan.status(), DeviceStatus::Unknown);
    assert!(fan.status_changed_at.is_none());

    // Pages of one, by prefix; tokens are tied to the prefix.
    let page = |prefix: &str, token: &str, size: i32| ListDevicesRequest {
        device_id_prefix: prefix.into(),
        page_token: token.into(),
        page_size: size,
        ..Default::default()
    };
    let first = client
        .clone()
        .list_devices(page("pump-", "", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&first.devices), ["pump-1"]);
    let second = client
        .clone()
        .list_devices(page("pump-", &first.next_page_token, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&second.devices), ["pump-2"]);
    assert!(second.next_page_token.is_empty());
    for (request, field) in [
        (page("fan-", &first.next_page_token, 1), "page_token"),
        (page("", "not-a-token", 1), "page_token"),
        (page("", "", -1), "page_size"),
        (page("", "", 1001), "page_size"),
        (page(&"p".repeat(257), "", 1), "device_id_prefix"),
    ] {
        let status = client.clone().list_devices(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }
    for (id, code) in [
        ("nobody", Code::NotFound),
        ("bad/id", Code::InvalidArgument),
        ("", Code::InvalidArgument),
    ] {
        let status = get(&client, id).await.unwrap_err();
        assert_eq!(status.code(), code, "{id}: {status:?}");
    }

    // pump-1's connection breaks: the broker publishes its last will.
    drop(pump);
    let device = wait_status(&client, "pump-1", DeviceStatus::Offline).await;
    let time = |t: Option<prost_types::Timestamp>| SystemTime::try_from(t.unwrap()).unwrap();
    assert!(time(device.status_changed_at) >= time(device.first_seen));
    // Status changes stream like readings.
    let mut seen = Vec::new();
    while seen != ["online", "offline"] {
        let message = within("a status message", statuses.message())
            .await
            .unwrap()
            .unwrap();
        if let Some(Event::Reading(r)) = message.event {
            assert_eq!(r.topic, "devices/pump-1/status");
            seen.push(String::from_utf8(r.payload.to_vec()).unwrap());
        }
    }

    // A command to an offline device is published, and says so.
    let command = |id: &str| SendCommandRequest {
        device_id: id.into(),
        command: "PING".into(),
        ..Default::default()
    };
    let response = client
        .clone()
        .send_command(command("pump-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.device_status(), DeviceStatus::Offline);
    assert!(!response.command_id.is_empty());
    let response = client
        .clone()
        .send_command(command("fan-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.device_status(), DeviceStatus::Unknown);

    // It reconnects: online again.
    let _pump = device_with_will(&broker, "pump-1").await;
    wait_status(&client, "pump-1", DeviceStatus::Online).await;

    // Its readings leave the buffer (20 readings): still listed, with the
    // newest reading kept.
    for i in 0..30 {
        other
            .publish("devices/fan-1/readings", format!("{i}"))
            .await;
    }
    let device = eventually("pump-1's readings evicted", || async {
        get(&client, "pump-1")
            .await
            .ok()
            .filter(|d| d.readings_buffered == 0)
    })
    .await;
    assert_eq!(
        device.last_reading.as_ref().unwrap().payload.as_ref(),
        br#"{"rpm": 2}"#
    );
    assert_eq!(device.status(), DeviceStatus::Online);
    service.stop().await;
}

/// The simulator through Mosquitto: devices come online, go offline when
/// the simulator is killed (their last wills), and come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_simulator_turns_its_devices_offline_on_mosquitto() {
    let mosquitto = Mosquitto::start();
    let url = mosquitto.url.to_string();
    let (mut serve, mut log) = spawn_devicehub(
        &["serve", "--grpc-addr", "127.0.0.1:0", "--mqtt-url", &url],
        &[],
    );
    let grpc = logged_addr(&mut log, "gRPC listening", "addr=").await;
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let client = eventually("a gRPC client", || {
        let url = format!("http://{grpc}");
        async move { DeviceHubClient::connect(url).await.ok() }
    })
    .await;
    let simulate = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
            .args([
                "simulate",
                "--mqtt-url",
                &url,
                "--devices",
                "3",
                "--interval-ms",
                "200",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };

    let mut simulator = simulate();
    for id in ["sim-1", "sim-2", "sim-3"] {
        wait_status(&client, id, DeviceStatus::Online).await;
    }
    let listed = eventually("three simulated devices with readings", || async {
        let page = client
            .clone()
            .list_devices(ListDevicesRequest {
                device_id_prefix: "sim-".into(),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner();
        page.devices
            .iter()
            .all(|d| d.last_reading.is_some())
            .then_some(page.devices)
    })
    .await;
    assert_eq!(ids(&listed), ["sim-1", "sim-2", "sim-3"]);

    // SIGKILL: no clean disconnect, so Mosquitto publishes the last wills.
    simulator.start_kill().unwrap();
    simulator.wait().await.unwrap();
    for id in ["sim-1", "sim-2", "sim-3"] {
        wait_status(&client, id, DeviceStatus::Offline).await;
    }
    let mut simulator = simulate();
    for id in ["sim-1", "sim-2", "sim-3"] {
        wait_status(&client, id, DeviceStatus::Online).await;
    }
    simulator.start_kill().unwrap();
    let _ = simulator.wait().await;
    let _ = serve.start_kill();
    let _ = serve.wait().await;
}
