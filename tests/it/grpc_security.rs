//! The gRPC port secured: TLS (also mutual, and certificates rotated without
//! a restart), bearer tokens checked against rotating keys, scopes that
//! narrow what a caller sees and commands, grpcurl with a CA and a token,
//! and the refusal to listen beyond loopback unprotected.

use crate::common;

use std::process::Stdio;

use common::{secure::*, tempdir::TempDir, tokens::*, *};
use devicehub::proto::{
    device_hub_client::DeviceHubClient, watch_readings_response::Event, GetDeviceRequest,
    ListDevicesRequest, ListReadingsRequest, SendCommandRequest, StreamCommandsRequest,
    WatchReadingsRequest,
};
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{interceptor::InterceptedService, Interceptor},
    transport::Channel,
    Code, Request, Status,
};

const ISSUER: &str = "devicehub-tests";
const AUDIENCE: &str = "devicehub";

/// Sends `authorization: Bearer <token>` on every call, when it has one.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = DeviceHubClient<InterceptedService<Channel, Bearer>>;

/// A TLS channel to the service, trusting `ca`, presenting `identity`.
async fn tls_channel(
    service: &TestService,
    ca: &str,
    identity: Option<&Issued>,
) -> Result<Channel, tonic::transport::Error> {
    grpc_tls_channel(service.addr, ca, identity).await
}

fn client(channel: &Channel, token: Option<&str>) -> Client {
    let value = token.map(|t| format!("Bearer {t}").parse().unwrap());
    DeviceHubClient::with_interceptor(channel.clone(), Bearer(value))
}

fn signed(signer: &Signer, subject: &str, scope: &str) -> String {
    let mut claims = claims(subject, scope, 3600);
    claims["iss"] = json!(ISSUER);
    claims["aud"] = json!(AUDIENCE);
    signer.sign(&claims)
}

fn list(device_id: &str) -> ListReadingsRequest {
    ListReadingsRequest {
        device_id: device_id.into(),
        page_size: 1000,
        ..Default::default()
    }
}

fn command(device_id: &str) -> SendCommandRequest {
    SendCommandRequest {
        device_id: device_id.into(),
        command: "PING".into(),
        ..Default::default()
    }
}

async fn devices_of(client: &mut Client, request: ListReadingsRequest) -> Vec<String> {
    let readings = client.list_readings(request).await.unwrap().into_inner();
    let mut devices: Vec<String> = readings.readings.into_iter().map(|r| r.device_id).collect();
    devices.sort();
    devices.dedup();
    devices
}

async fn assert_refused(client: &mut Client, code: Code, says: &str) {
    let status = client.list_readings(list("")).await.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(says), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_scopes_decide_who_sees_and_commands_what() {
    let broker = embedded_broker();
    let pki = Pki::new("grpc test CA");
    let dir = TempDir::new("grpc-security");
    let server = pki.server();
    let (es, ed, rsa) = (Signer::es256(), Signer::ed25519(), Signer::rs256());
    let cert = dir.write("server.crt", &server.cert);
    let key = dir.write("server.key", &server.key);
    // Two keys in one file (rotation), a third as a second flag.
    let keys = dir.write("keys.pem", &(es.public_pem.clone() + &ed.public_pem));
    let rsa_key = dir.write("rsa.pem", &rsa.public_pem);
    let args = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--auth-jwt-key",
        &keys,
        "--auth-jwt-key",
        &rsa_key,
        "--auth-jwt-issuer",
        ISSUER,
        "--auth-jwt-audience",
        AUDIENCE,
    ];
    let service = TestService::start(config(&broker, &args)).await;
    let channel = tls_channel(&service, &pki.ca_cert, None).await.unwrap();
    wait_serving(&channel).await; // health needs no token

    // `devicehub health` (the container healthcheck) over TLS, trusting the
    // CA; without it, it cannot get an answer.
    let ca = dir.write("ca.crt", &pki.ca_cert);
    let addr = service.addr.to_string();
    let probe = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
            .args(["health", "--grpc-addr", &addr])
            .args(extra)
            .output()
            .unwrap()
    };
    let output = probe(&["--tls-ca", &ca]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");
    assert_eq!(probe(&[]).status.code(), Some(1));

    let device = TestDevice::connect(&broker, "device-scopes", None).await;
    for id in ["greenhouse-1", "greenhouse-2", "pump-7"] {
        device.publish(&format!("devices/{id}/readings"), id).await;
    }
    let mut everything = client(
        &channel,
        Some(&signed(&rsa, "ops", "readings:read commands:send")),
    );
    eventually("all three devices listed", || {
        let mut client = everything.clone();
        async move { (devices_of(&mut client, list("")).await.len() == 3).then_some(()) }
    })
    .await;

    // Tokens that are missing, malformed, expired, foreign or for someone else.
    assert_refused(
        &mut client(&channel, None),
        Code::Unauthenticated,
        "missing",
    )
    .await;
    let garbage = "not-a-jwt-6f1d";
    let status = client(&channel, Some(garbage))
        .list_readings(list(""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("malformed") && !status.message().contains(garbage));
    let mut expired = claims("ops", "readings:read", -600);
    expired["iss"] = json!(ISSUER);
    expired["aud"] = json!(AUDIENCE);
    assert_refused(
        &mut client(&channel, Some(&es.sign(&expired))),
        Code::Unauthenticated,
        "expired",
    )
    .await;
    let stranger = signed(&Signer::es256(), "ops", "readings:read");
    assert_refused(
        &mut client(&channel, Some(&stranger)),
        Code::Unauthenticated,
        "signature",
    )
    .await;
    let mut other_issuer = claims("ops", "readings:read", 600);
    other_issuer["aud"] = json!(AUDIENCE);
    other_issuer["iss"] = json!("someone-else");
    assert_refused(
        &mut client(&channel, Some(&es.sign(&other_issuer))),
        Code::Unauthenticated,
        "issuer",
    )
    .await;
    let no_exp = json!({"sub": "ops", "scope": "readings:read", "iss": ISSUER, "aud": AUDIENCE});
    assert_refused(
        &mut client(&channel, Some(&es.sign(&no_exp))),
        Code::Unauthenticated,
        "exp",
    )
    .await;

    // A read scope narrowed to the greenhouses: lists and watches are
    // narrowed, naming another device is refused, commands are refused.
    let mut greenhouses = client(
        &channel,
        Some(&signed(&es, "dashboard", "readings:read:greenhouse-*")),
    );
    assert_eq!(
        devices_of(&mut greenhouses, list("")).await,
        ["greenhouse-1", "greenhouse-2"]
    );
    let by_filter = ListReadingsRequest {
        topic_filter: "devices/+/readings".into(),
        ..list("")
    };
    assert_eq!(
        devices_of(&mut greenhouses, by_filter).await,
        ["greenhouse-1", "greenhouse-2"]
    );
    let status = greenhouses.list_readings(list("pump-7")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("readings:read"), "{status:?}");
    // The device list is narrowed the same way.
    let listed = greenhouses
        .list_devices(ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(ids, ["greenhouse-1", "greenhouse-2"]);
    let status = greenhouses
        .get_device(GetDeviceRequest {
            device_id: "pump-7".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = greenhouses
        .send_command(command("greenhouse-1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("commands:send"), "{status:?}");
    let mut watch = greenhouses
        .watch_readings(WatchReadingsRequest::default())
        .await
        .unwrap()
        .into_inner();
    device.publish("devices/pump-7/readings", "hidden").await;
    device
        .publish("devices/greenhouse-2/readings", "shown")
        .await;
    let message = within("a greenhouse reading", watch.message())
        .await
        .unwrap()
        .unwrap();
    let Some(Event::Reading(reading)) = message.event else {
        panic!("not a reading")
    };
    assert_eq!(
        reading.device_id, "greenhouse-2",
        "pump-7's reading must not be sent"
    );

    // A send scope for one pump (EdDSA): that pump only, also per command
    // on a stream; no read scope at all.
    let mut pump = client(
        &channel,
        Some(&signed(&ed, "pump-controller", "commands:send:pump-7")),
    );
    pump.send_command(command("pump-7")).await.unwrap();
    let status = pump.send_command(command("pump-8")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_refused(&mut pump, Code::PermissionDenied, "readings:read").await;
    let requests = ["pump-7", "greenhouse-1"].map(|id| StreamCommandsRequest {
        request_id: u64::from(id == "greenhouse-1"),
        command: Some(command(id)),
    });
    let mut codes: Vec<(u64, Code)> = pump
        .stream_commands(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .map(|r| (r.request_id, Code::from_i32(r.status_code)))
        .collect()
        .await;
    codes.sort_by_key(|(id, _)| *id);
    assert_eq!(codes, [(0, Code::Ok), (1, Code::PermissionDenied)]);

    // The unrestricted token sees every device and commands any.
    assert_eq!(
        devices_of(&mut everything, list("")).await,
        ["greenhouse-1", "greenhouse-2", "pump-7"]
    );
    everything
        .send_command(command("greenhouse-1"))
        .await
        .unwrap();

    // Plaintext to the TLS port gets nowhere.
    let plain = Channel::from_shared(service.url()).unwrap().connect().await;
    if let Ok(plain) = plain {
        let status = client(&plain, None)
            .list_readings(list(""))
            .await
            .unwrap_err();
        assert_ne!(status.code(), Code::Ok);
    }

    // grpcurl, as a person would use it: reflection without a token, calls
    // with one.
    let grpcurl = which("grpcurl").expect("grpcurl (scripts/test.sh installs it)");
    let ca = dir.write("ca.crt", &pki.ca_cert);
    let run = |extra: &[&str]| {
        let mut command = std::process::Command::new(&grpcurl);
        command
            .args(["-cacert", &ca, "-servername", "localhost"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        command.output().unwrap()
    };
    let target = service.addr.to_string();
    let services = run(&[&target, "list"]);
    assert!(String::from_utf8_lossy(&services.stdout).contains("devicehub.v1.DeviceHub"));
    let header = format!(
        "authorization: Bearer {}",
        signed(&es, "cli", "readings:read:pump-*")
    );
    let listed = run(&[
        "-H",
        &header,
        "-d",
        "{}",
        &target,
        "devicehub.v1.DeviceHub/ListReadings",
    ]);
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && out.contains("pump-7") && !out.contains("greenhouse"),
        "{out}"
    );
    let refused = run(&["-d", "{}", &target, "devicehub.v1.DeviceHub/ListReadings"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("Unauthenticated"),
        "{err}"
    );

    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_and_certificates_rotated_without_a_restart() {
    let broker = embedded_broker();
    let (pki, clients) = (Pki::new("server CA"), Pki::new("client CA"));
    let dir = TempDir::new("grpc-mtls");
    let server = pki.server();
    let cert = dir.write("server.crt", &server.cert);
    let key = dir.write("server.key", &server.key);
    let client_ca = dir.write("clients.crt", &clients.ca_cert);
    let args = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &client_ca,
    ];
    let service = TestService::start(config(&broker, &args)).await;
    let identity = clients.client("svc-a");
    let channel = eventually("a client with a certificate to connect", || {
        let (service, ca, identity) = (&service, &pki.ca_cert, &identity);
        async move { tls_channel(service, ca, Some(identity)).await.ok() }
    })
    .await;
    wait_serving(&channel).await;
    client(&channel, None)
        .list_readings(list(""))
        .await
        .unwrap();

    // No client certificate, or one from another CA: no call gets through.
    for identity in [None, Some(&pki.client("intruder"))] {
        if let Ok(channel) = tls_channel(&service, &pki.ca_cert, identity).await {
            let status = client(&channel, None)
                .list_readings(list(""))
                .await
                .unwrap_err();
            assert_ne!(status.code(), Code::Ok);
        }
    }

    // grpcurl with a client certificate gets through; without, it does not.
    let grpcurl = which("grpcurl").expect("grpcurl (scripts/test.sh installs it)");
    let ca = dir.write("server-ca.crt", &pki.ca_cert);
    let client_cert = dir.write("client.crt", &identity.cert);
    let client_key = dir.write("client.key", &identity.key);
    let grpcurl_list = |with_cert: bool| {
        let mut command = std::process::Command::new(&grpcurl);
        command.args(["-cacert", &ca, "-servername", "localhost"]);
        if with_cert {
            command.args(["-cert", &client_cert, "-key", &client_key]);
        }
        command
            .args(["-d", "{}", &service.addr.to_string()])
            .arg("devicehub.v1.DeviceHub/ListReadings")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    assert!(grpcurl_list(true));
    assert!(!grpcurl_list(false));

    // Rotation: the files are replaced by a certificate from another CA;
    // new connections get it, without a restart.
    let next = Pki::new("next server CA");
    let rotated = next.server();
    std::fs::write(dir.path().join("server.key"), &rotated.key).unwrap();
    std::fs::write(dir.path().join("server.crt"), &rotated.cert).unwrap();
    eventually("the rotated certificate to be served", || {
        let (service, next, identity) = (&service, &next, &identity);
        async move {
            let channel = tls_channel(service, &next.ca_cert, Some(identity))
                .await
                .ok()?;
            client(&channel, None).list_readings(list("")).await.ok()
        }
    })
    .await;
    let old = tls_channel(&service, &pki.ca_cert, Some(&identity)).await;
    if let Ok(old) = old {
        assert!(client(&old, None).list_readings(list("")).await.is_err());
    }
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_needs_tls_and_auth_or_an_explicit_opt_in() {
    use clap::Parser;
    let check = |args: &[&str]| {
        cli::Cli::try_parse_from(std::iter::once("devicehub").chain(args.iter().copied()))
            .unwrap()
            .serve
            .check_exposure()
            .map_err(|e| e.to_string())
    };
    let error = check(&["--grpc-addr", "0.0.0.0:50051"]).unwrap_err();
    assert!(
        error.contains("--tls-cert") && error.contains("--allow-insecure"),
        "{error}"
    );
    let tls_only = [
        "--grpc-addr",
        "0.0.0.0:50051",
        "--tls-cert",
        "c",
        "--tls-key",
        "k",
    ];
    assert!(check(&tls_only).is_err(), "TLS without auth is not enough");
    let both = [
        &tls_only[..],
        &["--auth-jwt-key", "k.pem", "--mqtt-url", "mqtt://b"],
    ]
    .concat();
    assert!(check(&both).is_ok());
    assert!(check(&["--grpc-addr", "0.0.0.0:50051", "--allow-insecure"]).is_ok());
    let error = check(&["--embedded-mqtt-addr", "0.0.0.0:1883"]).unwrap_err();
    assert!(
        error.contains("--embedded-mqtt-addr")
            && error.contains("--allow-insecure-embedded-broker"),
        "{error}"
    );
    // Opening the gRPC port does not open the broker too.
    let error = check(&["--embedded-mqtt-addr", "0.0.0.0:1883", "--allow-insecure"]).unwrap_err();
    assert!(error.contains("--embedded-mqtt-addr"), "{error}");
    assert!(check(&[
        "--embedded-mqtt-addr",
        "0.0.0.0:1883",
        "--allow-insecure-embedded-broker"
    ])
    .is_ok());
    assert!(check(&[
        "--embedded-mqtt-addr",
        "0.0.0.0:1883",
        "--mqtt-url",
        "mqtt://b"
    ])
    .is_ok());
    assert!(check(&[]).is_ok(), "loopback stays zero-config");

    // The binary refuses to start, and says why.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args([
            "serve",
            "--grpc-addr",
            "0.0.0.0:0",
            "--embedded-mqtt-addr",
            "127.0.0.1:0",
        ])
        .output();
    let output = within("the refusal", output).await.unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--allow-insecure"));
}

/// A client sending exactly `authorization: <value>`.
fn client_sending(channel: &Channel, value: &str) -> Client {
    DeviceHubClient::with_interceptor(channel.clone(), Bearer(Some(value.parse().unwrap())))
}

/// A plaintext channel to `url`, once the service answers health checks.
async fn plain_channel(url: String) -> Channel {
    let channel = eventually("a plaintext connection", || {
        let url = url.clone();
        async move { Channel::from_shared(url).unwrap().connect().await.ok() }
    })
    .await;
    wait_serving(&channel).await;
    channel
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_not_valid_yet_are_refused_and_the_bearer_scheme_has_any_case() {
    let broker = embedded_broker();
    let dir = TempDir::new("grpc-nbf");
    let es = Signer::es256();
    let keys = dir.write("keys.pem", &es.public_pem);
    let args = [
        "--auth-jwt-key",
        &keys,
        "--auth-jwt-issuer",
        ISSUER,
        "--auth-jwt-audience",
        AUDIENCE,
    ];
    let service = TestService::start(config(&broker, &args)).await;
    let channel = plain_channel(service.url()).await;

    // `nbf` seconds from now (negative: in the past).
    let valid_from = |from_now: i64| {
        let mut claims = claims("ops", "readings:read", 3600);
        claims["iss"] = json!(ISSUER);
        claims["aud"] = json!(AUDIENCE);
        claims["nbf"] = json!(claims["iat"].as_i64().unwrap() + from_now);
        es.sign(&claims)
    };
    let later = valid_from(600);
    let status = client(&channel, Some(&later))
        .list_readings(list(""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let message = status.message();
    assert!(message.contains("not valid yet"), "{status:?}");
    assert!(
        !message.contains(&later) && !message.contains("Immature") && !message.contains("internal"),
        "{status:?}"
    );
    client(&channel, Some(&valid_from(-60)))
        .list_readings(list(""))
        .await
        .unwrap();
    // Within the leeway that `exp` has too (clock skew with the issuer).
    client(&channel, Some(&valid_from(2)))
        .list_readings(list(""))
        .await
        .unwrap();

    // RFC 7235: the auth scheme is case-insensitive.
    let token = signed(&es, "ops", "readings:read");
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        client_sending(&channel, &format!("{scheme} {token}"))
            .list_readings(list(""))
            .await
            .unwrap_or_else(|status| panic!("{scheme}: {status:?}"));
    }
    for value in [format!("Basic {token}"), format!("Bearer{token}")] {
        assert_refused(
            &mut client_sending(&channel, &value),
            Code::Unauthenticated,
            "Bearer <token>",
        )
        .await;
    }
    service.stop().await;
}

/// Reads the binary's log until its "gRPC listening" line; returns the
/// lines before it and the address it logged.
async fn startup_log(log: &mut ServiceLog) -> (Vec<String>, String) {
    let mut lines = Vec::new();
    loop {
        let line = within("gRPC listening", log.next_line())
            .await
            .unwrap()
            .expect("log ended");
        eprintln!("{line}");
        if line.contains("gRPC listening") {
            let addr = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("addr="))
                .unwrap_or_else(|| panic!("addr= in {line}"))
                .to_owned();
            return (lines, addr);
        }
        lines.push(line);
    }
}

/// Replaces the file at `path` as rotation tools do: written aside, renamed
/// over it.
fn replace(path: &str, text: &str) {
    let aside = format!("{path}.new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_rotated_without_a_restart_and_a_bad_key_file_keeps_the_old_keys() {
    let dir = TempDir::new("grpc-jwt-reload");
    let (a, b) = (Signer::es256(), Signer::es256());
    let keys = dir.write("jwt.pem", &a.public_pem);
    let serve = |audience: Option<&str>| {
        let mut args = vec![
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--embedded-mqtt-addr",
            "127.0.0.1:0",
            "--auth-jwt-key",
            &keys,
            "--auth-jwt-issuer",
            ISSUER,
        ];
        if let Some(audience) = audience {
            args.extend(["--auth-jwt-audience", audience]);
        }
        spawn_devicehub(&args, &[])
    };

    // With an audience, no warning about it.
    let (mut with_audience, mut log) = serve(Some(AUDIENCE));
    let (startup, _) = startup_log(&mut log).await;
    assert!(
        !startup.iter().any(|l| l.contains("--auth-jwt-audience")),
        "{startup:#?}"
    );
    terminate(&mut with_audience).await;

    // Without: a warning, with the issuer as a field, that any audience goes.
    let (mut service, mut log) = serve(None);
    let (startup, addr) = startup_log(&mut log).await;
    let warning = startup
        .iter()
        .find(|l| l.contains("WARN") && l.contains("--auth-jwt-audience"))
        .unwrap_or_else(|| panic!("no audience warning in {startup:#?}"));
    assert!(
        warning.contains("any token") && warning.contains(&format!("issuer={ISSUER:?}")),
        "{warning}"
    );
    let (lines, mut later) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = log.next_line().await {
            eprintln!("{line}");
            let _ = lines.send(line);
        }
    });
    let channel = plain_channel(format!("http://{addr}")).await;

    let token = |signer: &Signer, subject: &str| {
        let mut claims = claims(subject, "readings:read", 3600);
        claims["iss"] = json!(ISSUER);
        signer.sign(&claims)
    };
    let (token_a, token_b) = (token(&a, "ops"), token(&b, "ops"));
    client(&channel, Some(&token_a))
        .list_readings(list(""))
        .await
        .unwrap();
    assert_refused(
        &mut client(&channel, Some(&token_b)),
        Code::Unauthenticated,
        "signature",
    )
    .await;

    // The key file now holds B: B's tokens get in without a restart, and
    // A's no longer do (not even the one verified before, while cached).
    replace(&keys, &b.public_pem);
    eventually("a token signed by the new key to be accepted", || {
        let mut client = client(&channel, Some(&token_b));
        async move { client.list_readings(list("")).await.ok() }
    })
    .await;
    assert_refused(
        &mut client(&channel, Some(&token_a)),
        Code::Unauthenticated,
        "signature",
    )
    .await;

    // A key file that does not load: logged (without its contents), and B
    // still verifies, also a token it signs that was never seen (no cache).
    let garbage = "-----BEGIN PUBLIC KEY-----\nnot-a-key-8c2e\n-----END PUBLIC KEY-----\n";
    replace(&keys, garbage);
    let warning = within("the warning about the bad key file", async {
        loop {
            let line = later.recv().await.expect("log ended");
            if line.contains("JWT key files changed but do not load") {
                return line;
            }
        }
    })
    .await;
    assert!(
        warning.contains("WARN") && warning.contains("jwt.pem") && !warning.contains("not-a-key"),
        "{warning}"
    );
    client(&channel, Some(&token(&b, "another")))
        .list_readings(list(""))
        .await
        .unwrap();
    terminate(&mut service).await;
}
