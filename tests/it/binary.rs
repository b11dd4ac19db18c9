//! The `devicehub` binary as a user runs it: `serve` with the embedded broker
//! on ephemeral ports, `simulate` feeding it, and SIGTERM ending both.

use crate::common;

use std::process::Stdio;

use common::*;
use devicehub::{
    config::BrokerUrl,
    proto::{
        device_hub_client::DeviceHubClient, CommandStatus, ListReadingsRequest, SendCommandRequest,
    },
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{ChildStdout, Command},
};

const BINARY: &str = env!("CARGO_BIN_EXE_devicehub");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_simulate_run_until_sigterm() {
    let (mut serve, mut log) = spawn_devicehub(
        &[
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--embedded-mqtt-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let broker = logged_addr(&mut log, "embedded MQTT broker listening", "addr=").await;
    let grpc = logged_addr(&mut log, "gRPC listening", "addr=").await;
    // Keep draining the log so the service never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });

    let broker: BrokerUrl = format!("mqtt://{broker}").parse().unwrap();
    let mut simulate = Command::new(BINARY)
        .args([
            "simulate",
            "--devices",
            "3",
            "--interval-ms",
            "50",
            "--silent-fraction",
            "0.34",
        ])
        .env("DEVICEHUB_MQTT_URL", broker.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut printed: Lines<BufReader<ChildStdout>> =
        BufReader::new(simulate.stdout.take().unwrap()).lines();

    let client = eventually("the gRPC server", || async {
        DeviceHubClient::connect(format!("http://{grpc}"))
            .await
            .ok()
    })
    .await;
    for device in ["sim-1", "sim-2"] {
        let request = ListReadingsRequest {
            device_id: device.into(),
            topic_filter: "devices/+/readings".into(),
            ..Default::default()
        };
        let what = format!("a reading from {device}");
        let reading = list_until(&what, &client, request, |mut readings| readings.pop()).await;
        assert!(reading.json.is_some(), "simulated readings are JSON");
        let json = String::from_utf8_lossy(&reading.payload);
        assert!(
            json.contains("temperature") && json.contains("humidity"),
            "{json}"
        );
    }

    let sent = client
        .clone()
        .send_command(SendCommandRequest {
            device_id: "sim-1".into(),
            command: "TURN_ON_FAN".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let line = within("the simulator to print the command", printed.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(
        line.starts_with("sim-1 received command") && line.contains(&sent.command_id),
        "{line}"
    );

    // Simulated devices answer commands: known ones ok and take effect,
    // unknown ones with an error.
    let round_trip = |device: &str, command: &str| SendCommandRequest {
        device_id: device.into(),
        command: command.into(),
        reply_timeout: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        ..Default::default()
    };
    let fan_on = client
        .clone()
        .send_command(round_trip("sim-2", "TURN_ON_FAN"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fan_on.reply.unwrap().status(), CommandStatus::Ok);
    let request = ListReadingsRequest {
        device_id: "sim-2".into(),
        topic_filter: "devices/+/readings".into(),
        page_size: 1,
        ..Default::default()
    };
    list_until(
        "sim-2 readings with the fan on",
        &client,
        request,
        |mut readings| {
            let json: serde_json::Value = serde_json::from_slice(&readings.pop()?.payload).ok()?;
            (json["fan"] == true).then_some(())
        },
    )
    .await;
    let unknown = client
        .clone()
        .send_command(round_trip("sim-2", "SELF_DESTRUCT"))
        .await
        .unwrap()
        .into_inner();
    let reply = unknown.reply.unwrap();
    assert_eq!(reply.status(), CommandStatus::Error);
    assert!(reply.message.contains("SELF_DESTRUCT"), "{reply:?}");
    // sim-1 is the silent one (a third of three devices).
    let mut silent = round_trip("sim-1", "PING");
    silent.reply_timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 300_000_000,
    });
    let status = client.clone().send_command(silent).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");

    assert!(terminate(&mut simulate).await.success());
    assert!(terminate(&mut serve).await.success());
}

/// A command to a device nobody runs, waiting 100 ms for its reply: a call
/// the server fails with DEADLINE_EXCEEDED.
fn unanswered() -> SendCommandRequest {
    SendCommandRequest {
        device_id: "nobody".into(),
        command: "PING".into(),
        reply_timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 100_000_000,
        }),
        ..Default::default()
    }
}

/// `--log-format json`: every line the service writes is one JSON object
/// with timestamp, level, target, message and the event's fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_as_json() {
    let args = [
        "serve",
        "--log-format",
        "json",
        "--grpc-addr",
        "127.0.0.1:0",
    ];
    let args = [&args[..], &["--embedded-mqtt-addr", "127.0.0.1:0"]].concat();
    let (mut serve, mut log) = spawn_devicehub(&args, &[]);
    let mut seen = Vec::new();
    // Up to the lines that say it listens and is subscribed, in either order.
    let logged =
        |seen: &[serde_json::Value], message: &str| seen.iter().any(|l| l["message"] == message);
    while !logged(&seen, "gRPC listening")
        || !logged(
            &seen,
            "subscribed to readings, status, reported states and replies",
        )
    {
        let line = within("a JSON log line", log.next_line())
            .await
            .unwrap()
            .expect("log ended");
        let object: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(object.get(key).is_some(), "no {key} in {line}");
        }
        seen.push(object);
    }
    let listening = seen
        .iter()
        .find(|l| l["message"] == "gRPC listening")
        .unwrap();
    assert!(listening["addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert_eq!(listening["level"], "INFO");

    // A call the server fails (no device answers in time): one line at
    // info, with the call's span (method, peer) and its code and duration.
    let addr = listening["addr"].as_str().unwrap();
    let mut client = eventually("a gRPC client", || {
        let url = format!("http://{addr}");
        async move { DeviceHubClient::connect(url).await.ok() }
    })
    .await;
    let status = client.send_command(unanswered()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    let failed = loop {
        let line = within("the call's log line", log.next_line())
            .await
            .unwrap()
            .expect("log ended");
        let object: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if object["message"] == "call failed" {
            break object;
        }
    };
    assert_eq!(failed["level"], "INFO");
    assert_eq!(failed["code"], "DeadlineExceeded");
    assert!(failed["duration_ms"].as_f64().unwrap() >= 100.0, "{failed}");
    let span = &failed["span"];
    assert_eq!(span["name"], "rpc", "{failed}");
    assert_eq!(span["rpc.service"], "devicehub.v1.DeviceHub", "{failed}");
    assert_eq!(span["rpc.method"], "SendCommand", "{failed}");
    assert!(
        span["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{failed}"
    );
    assert_eq!(terminate(&mut serve).await.code(), Some(0));
}

/// `devicehub health`: exit 0 and SERVING while the service is up, 1 with a
/// reason when nothing answers (a container healthcheck with no other tool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_subcommand_answers_for_a_running_service() {
    let args = [
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--embedded-mqtt-addr",
        "127.0.0.1:0",
    ];
    let (mut serve, mut log) = spawn_devicehub(&args, &[]);
    let addr = logged_addr(&mut log, "gRPC listening", "addr=").await;
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let health = |addr: String| async move {
        Command::new(env!("CARGO_BIN_EXE_devicehub"))
            .args(["health", "--grpc-addr", &addr])
            .env_remove("DEVICEHUB_GRPC_ADDR")
            .output()
            .await
            .unwrap()
    };
    let output = eventually("health SERVING", || {
        let addr = addr.clone();
        async move {
            let output = health(addr).await;
            output.status.success().then_some(output)
        }
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");
    // 0.0.0.0 means this host.
    let port = addr.rsplit(':').next().unwrap();
    assert!(health(format!("0.0.0.0:{port}")).await.status.success());
    assert_eq!(terminate(&mut serve).await.code(), Some(0));

    let output = health(addr.clone()).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&format!("cannot reach {addr}")), "{stderr}");
}

/// With auth, the caller's identity (the token's subject) joins the call's
/// span, so the log line of a failed call names who made it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_calls_log_line_names_the_caller() {
    let dir = tempdir::TempDir::new("caller-log");
    let signer = tokens::Signer::es256();
    let key = dir.path().join("key.pem");
    std::fs::write(&key, &signer.public_pem).unwrap();
    let key = key.display().to_string();
    let args = [
        "serve",
        "--log-format",
        "json",
        "--grpc-addr",
        "127.0.0.1:0",
        "--embedded-mqtt-addr",
        "127.0.0.1:0",
        "--auth-jwt-key",
        &key,
    ];
    let (mut serve, mut log) = spawn_devicehub(&args, &[]);
    let addr = loop {
        let line = within("the listening line", log.next_line())
            .await
            .unwrap()
            .expect("log ended");
        let object: Value = serde_json::from_str(&line).unwrap();
        if object["message"] == "gRPC listening" {
            break object["addr"].as_str().unwrap().to_owned();
        }
    };
    let channel = eventually("a gRPC channel", || {
        let url = format!("http://{addr}");
        async move {
            tonic::transport::Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .ok()
        }
    })
    .await;
    let mut request = tonic::Request::new(unanswered());
    let token = signer.token("alice", "commands:send");
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let status = eventually("the command to time out (the link up)", || {
        let mut client = DeviceHubClient::new(channel.clone());
        let request = tonic::Request::from_parts(
            request.metadata().clone(),
            Default::default(),
            request.get_ref().clone(),
        );
        async move {
            let status = client.send_command(request).await.unwrap_err();
            (status.code() == tonic::Code::DeadlineExceeded).then_some(status)
        }
    })
    .await;
    assert!(!status.message().contains(&token));
    let failed = loop {
        let line = within("the call's log line", log.next_line())
            .await
            .unwrap()
            .expect("log ended");
        let object: Value = serde_json::from_str(&line).unwrap();
        if object["message"] == "call failed" && object["code"] == "DeadlineExceeded" {
            break object;
        }
    };
    assert_eq!(failed["span"]["caller"], "alice", "{failed}");
    assert!(
        !failed.to_string().contains(&token),
        "the token is never logged"
    );
    assert_eq!(terminate(&mut serve).await.code(), Some(0));
}
