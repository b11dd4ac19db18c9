//! devicehub against the secured broker it ships a config for
//! (`deploy/mosquitto`): TLS, a password file and an ACL that keeps every
//! device to its own topics; a wrong password or an untrusted broker
//! certificate said plainly in the log, never the password; a broker that
//! authenticates clients by certificate.

use crate::common;

use std::time::Duration;

use common::{secure::*, tempdir::TempDir, *};
use devicehub::proto::{ListReadingsRequest, SendCommandRequest};
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE_PASSWORD: &str = "service-secret-3141";
const ACCOUNTS: &[(&str, &str)] = &[
    ("devicehub", SERVICE_PASSWORD),
    ("dev-a", "a-secret"),
    ("dev-b", "b-secret"),
];

/// The flags that point the service at `broker` with its CA and account;
/// the password file lives in `dir`.
fn login_args(broker: &SecureMosquitto, dir: &TempDir, password: &str) -> Vec<String> {
    let password_file = dir.path().join("mqtt-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    vec![
        "--mqtt-ca".into(),
        broker.ca_file.display().to_string(),
        "--mqtt-username".into(),
        "devicehub".into(),
        "--mqtt-password-file".into(),
        password_file.display().to_string(),
    ]
}

fn command(device_id: &str, reply_timeout: Option<Duration>) -> SendCommandRequest {
    SendCommandRequest {
        device_id: device_id.into(),
        command: "PING".into(),
        reply_timeout: reply_timeout.map(|t| t.try_into().unwrap()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_and_commands_flow_through_the_shipped_secure_broker_and_its_acl() {
    let pki = Pki::new("devicehub test CA");
    let secure = SecureMosquitto::start(&pki, ACCOUNTS);
    let dir = TempDir::new("secure-login");
    let args = login_args(&secure, &dir, SERVICE_PASSWORD);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = TestService::start_ready(config(&secure.broker.url, &args)).await;
    let mut client = service.client().await;

    let connect = |user: &'static str, password: &'static str| {
        let options = secure.client_options(user, password);
        let commands = format!("devices/{user}/commands");
        async move { TestDevice::connect_options(options, Some(&commands)).await }
    };
    let mut dev_a = connect("dev-a", "a-secret").await;
    let mut dev_b = connect("dev-b", "b-secret").await;

    // dev-a's own reading is stored; the one it forges for dev-b is refused
    // by the broker. Published first, so it would be stored before.
    dev_a.publish("devices/dev-b/readings", "forged").await;
    dev_a.publish("devices/dev-a/readings", "own").await;
    let reading = newest_reading_of(&client, "dev-a").await;
    assert_eq!(reading.payload.as_ref(), b"own");
    let dev_b_readings = client
        .list_readings(ListReadingsRequest {
            device_id: "dev-b".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .readings;
    assert!(dev_b_readings.is_empty(), "{dev_b_readings:?}");

    // A round trip with dev-a over TLS.
    let call = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .send_command(command("dev-a", Some(Duration::from_secs(10))))
                .await
        }
    });
    let envelope: serde_json::Value =
        serde_json::from_slice(&dev_a.next_message().await.payload).unwrap();
    let reply = serde_json::json!({"id": envelope["id"], "status": "ok", "result": "pong"});
    dev_a
        .publish("devices/dev-a/replies", reply.to_string())
        .await;
    let response = within("dev-a's reply", call).await.unwrap().unwrap();
    assert!(response.into_inner().reply.is_some());

    // dev-a answers a command that went to dev-b, in dev-b's name: the
    // broker drops it, and the caller times out instead of getting it.
    let call = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .send_command(command("dev-b", Some(Duration::from_secs(2))))
                .await
        }
    });
    let envelope: serde_json::Value =
        serde_json::from_slice(&dev_b.next_message().await.payload).unwrap();
    let forged = serde_json::json!({"id": envelope["id"], "status": "ok", "result": "forged"});
    dev_a
        .publish("devices/dev-b/replies", forged.to_string())
        .await;
    let status = within("the forged reply's call", call)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");

    // The service logged in as itself, over TLS, once.
    let log = secure.broker.log();
    let logins = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(" as devicehub "))
        .count();
    assert_eq!(logins, 1, "{log}");
    assert!(log.contains("Denied PUBLISH from dev-a"), "{log}");
    assert_eq!(service.health().await, ServingStatus::Serving);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_acl_keeps_each_device_to_its_own_desired_and_reported_state() {
    let pki = Pki::new("devicehub test CA");
    let secure = SecureMosquitto::start(&pki, ACCOUNTS);
    let dir = TempDir::new("secure-state");
    let args = login_args(&secure, &dir, SERVICE_PASSWORD);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = TestService::start_ready(config(&secure.broker.url, &args)).await;
    let client = service.client().await;
    for device in ["dev-b", "dev-a"] {
        crate::state::update(&client, device, serde_json::json!({"owner": device}), 0)
            .await
            .unwrap();
    }
    // Subscribed to every device's desired state, dev-a gets its own only
    // (retained, published by devicehub's account).
    let options = secure.client_options("dev-a", "a-secret");
    let mut dev_a = TestDevice::connect_options(options, Some("devices/+/state/desired")).await;
    let message = dev_a.next_message().await;
    assert_eq!(message.topic, "devices/dev-a/state/desired");
    let document: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(document["desired"], serde_json::json!({"owner": "dev-a"}));

    // Its report for dev-b is refused by the broker; its own is applied.
    dev_a
        .publish("devices/dev-b/state/reported", r#"{"owner": "forged"}"#)
        .await;
    dev_a
        .publish("devices/dev-a/state/reported", r#"{"owner": "dev-a"}"#)
        .await;
    crate::state::wait_state(&client, "dev-a", "dev-a's report", |s| {
        s.reported_update_time.is_some()
    })
    .await;
    let dev_b = crate::state::get_state(&client, "dev-b").await.unwrap();
    assert!(dev_b.reported_update_time.is_none(), "{dev_b:?}");
    assert!(dev_a.received.try_recv().is_err(), "nothing of dev-b's");
    assert!(secure.broker.log().contains("Denied PUBLISH from dev-a"));
    service.stop().await;
}

/// Runs the binary against `broker` with `args`, reads its log until a line
/// contains `expect`, checks health is NOT_SERVING meanwhile and that
/// `password` never appears in anything it logged, then stops it.
async fn binary_fails_to_log_in(
    broker: &SecureMosquitto,
    args: &[&str],
    password: &str,
    expect: &str,
) {
    let url = broker.broker.url.to_string();
    let serve_args = ["serve", "--grpc-addr", "127.0.0.1:0", "--mqtt-url", &url];
    let (mut serve, mut log) = spawn_devicehub(
        &[&serve_args[..], args].concat(),
        &[("DEVICEHUB_MQTT_PASSWORD", password)],
    );
    let grpc = logged_addr(&mut log, "gRPC listening", "addr=").await;
    // Two lines saying so: the first attempt and a retry after the backoff.
    let mut seen = Vec::new();
    let found = tokio::time::timeout(PATIENCE, async {
        let mut found = 0;
        while found < 2 {
            let Ok(Some(line)) = log.next_line().await else {
                break;
            };
            found += usize::from(line.contains(expect));
            seen.push(line);
        }
        found
    })
    .await;
    assert_eq!(found, Ok(2), "{expect:?} twice in:\n{}", seen.join("\n"));
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: devicehub::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::NotServing);
    let _ = serve.start_kill();
    let _ = serve.wait().await;
    let all = seen.join("\n");
    assert!(!all.contains(password), "the password was logged:\n{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_or_an_untrusted_broker_is_logged_plainly_and_retried() {
    let pki = Pki::new("devicehub test CA");
    let secure = SecureMosquitto::start(&pki, ACCOUNTS);
    let ca = secure.ca_file.display().to_string();
    let login = ["--mqtt-ca", &ca, "--mqtt-username", "devicehub"];
    binary_fails_to_log_in(
        &secure,
        &login,
        "not-the-password-2718",
        "refused the login",
    )
    .await;

    // A CA that did not sign the broker's certificate.
    let dir = TempDir::new("other-ca");
    let other_ca = dir.path().join("other-ca.crt");
    std::fs::write(&other_ca, Pki::new("another CA").ca_cert).unwrap();
    let other_ca = other_ca.display().to_string();
    let untrusted = ["--mqtt-ca", &other_ca, "--mqtt-username", "devicehub"];
    binary_fails_to_log_in(
        &secure,
        &untrusted,
        SERVICE_PASSWORD,
        "TLS with the broker failed",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_authenticates_clients_by_certificate() {
    let pki = Pki::new("devicehub test CA");
    // AWS IoT style: the certificate is the identity, its common name the
    // account the ACL knows.
    let secure = SecureMosquitto::start_conf(&pki, ACCOUNTS, |conf| {
        conf + "\nrequire_certificate true\nuse_identity_as_username true\n"
    });
    let dir = TempDir::new("client-cert");
    let identity = pki.client("devicehub");
    let (cert, key) = (dir.path().join("client.crt"), dir.path().join("client.key"));
    std::fs::write(&cert, identity.cert).unwrap();
    std::fs::write(&key, identity.key).unwrap();
    let ca = secure.ca_file.display().to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let args = [
        "--mqtt-ca",
        &ca,
        "--mqtt-client-cert",
        &cert,
        "--mqtt-client-key",
        &key,
    ];
    let service = TestService::start_ready(config(&secure.broker.url, &args)).await;
    let mut client = service.client().await;
    client.send_command(command("dev-a", None)).await.unwrap();
    service.stop().await;

    // Without the certificate the broker will not have it.
    let without = ["--mqtt-ca", &ca, "--mqtt-username", "devicehub"];
    binary_fails_to_log_in(&secure, &without, "unused", "TLS with the broker failed").await;
}

#[test]
fn tls_and_login_flags_are_checked_at_startup() {
    use clap::Parser;
    let plain = devicehub::config::BrokerUrl::from_addr("127.0.0.1:1883".parse().unwrap());
    let tls: devicehub::config::BrokerUrl = "mqtts://127.0.0.1:8883".parse().unwrap();
    let parse = |args: &[&str]| {
        cli::Cli::try_parse_from(std::iter::once("devicehub").chain(args.iter().copied()))
            .unwrap()
            .serve
    };
    let error = |args: &[&str], broker| parse(args).config(broker).unwrap_err().to_string();
    assert!(error(&["--mqtt-ca", "/x"], &plain).contains("--mqtt-ca needs an mqtts://"));
    assert!(error(&["--mqtt-ca", "/nonexistent/ca.pem"], &tls).contains("/nonexistent/ca.pem"));
    assert!(error(&["--mqtt-client-cert", "/x"], &tls).contains("go together"));
    let dir = TempDir::new("bad-pem");
    let bad = dir.path().join("ca.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let bad = bad.display().to_string();
    assert!(error(&["--mqtt-ca", &bad], &tls).contains("no PEM certificate"));
    let secret = dir.path().join("password");
    std::fs::write(&secret, "hunter2\n").unwrap();
    let secret = secret.display().to_string();
    let message = error(&["--mqtt-password-file", &secret], &plain);
    assert!(message.contains("needs --mqtt-username") && !message.contains("hunter2"));
    // The password is read (one trailing newline dropped) and never printed.
    let config = parse(&["--mqtt-username", "u", "--mqtt-password-file", &secret])
        .config(&plain)
        .unwrap();
    let login = config.mqtt.credentials.clone().unwrap();
    assert_eq!(login.password.expose(), "hunter2");
    assert!(!format!("{config:?}").contains("hunter2"));
}

/// Small QoS 0 readings right after a QoS 1 burst, through the shipped
/// config, all reach the watcher in order. Their latency is not asserted
/// here (a timed test only measures the machine it runs on): scenario 3 of
/// the benchmark measures it. Without the config's `set_tcp_nodelay true`, a
/// release build held each such reading ~10 ms (p50 9.7 ms instead of
/// 0.3 ms), so this test also checks that the shipped config keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_stay_prompt_after_a_burst_through_the_shipped_config() {
    use devicehub::proto::{watch_readings_response::Event, WatchReadingsRequest};
    let pki = Pki::new("devicehub test CA");
    let secure = SecureMosquitto::start(&pki, ACCOUNTS);
    let dir = TempDir::new("latency-login");
    let args = login_args(&secure, &dir, SERVICE_PASSWORD);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = TestService::start_ready(config(&secure.broker.url, &args)).await;
    let mut client = service.client().await;
    let device =
        TestDevice::connect_options(secure.client_options("dev-a", "a-secret"), None).await;
    let mut watch = client
        .watch_readings(WatchReadingsRequest {
            device_id: "dev-a".into(),
            gap_policy: devicehub::proto::GapPolicy::Notify.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // The burst, at QoS 1, read to the end.
    let burst = 2000;
    for i in 0..burst {
        device
            .publish("devices/dev-a/readings", format!("burst {i}"))
            .await;
    }
    let mut seen = 0;
    while seen < burst {
        let message = within("the burst", watch.message()).await.unwrap().unwrap();
        seen += usize::from(matches!(message.event, Some(Event::Reading(_))));
    }
    // Then small QoS 0 readings, one at a time, each timed to its watcher.
    let mut latencies = Vec::new();
    for i in 0..40 {
        let sent = std::time::Instant::now();
        device
            .client
            .publish(
                "devices/dev-a/readings",
                rumqttc::QoS::AtMostOnce,
                false,
                format!("q0 {i}"),
            )
            .await
            .unwrap();
        loop {
            let message = within("a QoS 0 reading", watch.message())
                .await
                .unwrap()
                .unwrap();
            if let Some(Event::Reading(reading)) = message.event {
                assert_eq!(reading.payload, format!("q0 {i}").as_bytes(), "in order");
                break;
            }
        }
        latencies.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    latencies.sort();
    eprintln!(
        "QoS 0 after a QoS 1 burst: median {:?}, max {:?} (informational)",
        latencies[latencies.len() / 2],
        latencies.last()
    );
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mosquitto/mosquitto.conf"),
    )
    .unwrap();
    assert!(
        shipped
            .lines()
            .any(|line| line.trim() == "set_tcp_nodelay true"),
        "the shipped mosquitto.conf must keep `set_tcp_nodelay true`"
    );
    service.stop().await;
}

/// `devicehub simulate` through the shipped broker: each device logs in
/// with its own account and password (`--mqtt-username '{device_id}'`,
/// `--mqtt-password-file 'dir/{device_id}'`), so the ACL lets it publish its
/// readings, status and replies and read its commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_logs_in_as_each_device_through_the_shipped_broker() {
    use devicehub::proto::{DeviceStatus, GetDeviceRequest};
    let pki = Pki::new("devicehub test CA");
    let accounts = [
        ("devicehub", SERVICE_PASSWORD),
        ("sim-1", "sim-1-secret"),
        ("sim-2", "sim-2-secret"),
    ];
    let secure = SecureMosquitto::start(&pki, &accounts);
    let dir = TempDir::new("secure-sim");
    let args = login_args(&secure, &dir, SERVICE_PASSWORD);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let service = TestService::start_ready(config(&secure.broker.url, &args)).await;
    let mut client = service.client().await;

    let url = secure.broker.url.to_string();
    let ca = secure.ca_file.display().to_string();
    for (device, password) in &accounts[1..] {
        std::fs::write(dir.path().join(format!("{device}.password")), password).unwrap();
    }
    let passwords = dir.path().join("{device_id}.password");
    let mut simulator = tokio::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args(["simulate", "--mqtt-url", &url, "--mqtt-ca", &ca])
        .args(["--mqtt-username", "{device_id}", "--devices", "2"])
        .args(["--interval-ms", "200"])
        .arg("--mqtt-password-file")
        .arg(&passwords)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for id in ["sim-1", "sim-2"] {
        eventually(&format!("{id} online with a reading"), || {
            let mut client = client.clone();
            async move {
                let request = GetDeviceRequest {
                    device_id: id.into(),
                };
                let device = client.get_device(request).await.ok()?.into_inner().device?;
                (device.status() == DeviceStatus::Online && device.last_reading.is_some())
                    .then_some(())
            }
        })
        .await;
    }
    let response = client
        .send_command(command("sim-2", Some(Duration::from_secs(5))))
        .await
        .unwrap()
        .into_inner();
    assert!(response.reply.is_some(), "sim-2 answered through the ACL");
    simulator.start_kill().unwrap();
    let _ = simulator.wait().await;
    service.stop().await;
}
