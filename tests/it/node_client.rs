//! The contract from Node.js: the TypeScript client in examples/node (code
//! generated from the proto by `buf generate`, Connect over real gRPC)
//! against the real server: list, send, and a watch whose connection is cut
//! and which resumes with `after_seq`, getting every reading exactly once;
//! list and send also over gRPC-Web, the protocol browsers speak.
//! scripts/test.sh installs the client (`npm ci`) and generates its code.

use crate::common;

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    net::{TcpListener, TcpStream},
    process::{ChildStdout, Command},
    task::JoinHandle,
};

const NODE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/node");

/// The client as one node process (`--import tsx` compiles the TypeScript
/// in-process; the `tsx` command would run node as a child, which a kill
/// would not reach).
fn client(target: &str, args: &[&str]) -> Command {
    assert!(
        std::path::Path::new(&format!("{NODE_DIR}/node_modules/tsx")).exists()
            && std::path::Path::new(&format!("{NODE_DIR}/src/gen")).exists(),
        "the Node client is not installed: run `npm ci` in examples/node and `buf generate` (scripts/test.sh does both)"
    );
    let node = which("node").expect("node (Node.js 20) is not installed");
    let mut command = Command::new(node);
    command
        .current_dir(NODE_DIR)
        .args(["--import", "tsx", "src/client.ts"])
        .arg(args[0])
        .args(["--target", target])
        .args(&args[1..])
        .kill_on_drop(true);
    command
}

/// A TCP proxy in front of the service whose connections the test can cut.
struct Proxy {
    addr: SocketAddr,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pipes = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let pipes = pipes.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    pipes.lock().unwrap().push(pipe);
                }
            }
        });
        Self {
            addr,
            pipes,
            accept,
        }
    }

    /// Drops every connection through the proxy, as a network failure would.
    fn cut(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Collects the watch's readings into `printed` up to the one with
/// `"i": want`; false if the watch ended first.
async fn read_until(
    lines: &mut Lines<BufReader<ChildStdout>>,
    want: i64,
    printed: &mut Vec<Value>,
) -> bool {
    loop {
        let Some(line) = within("a watched reading", lines.next_line())
            .await
            .unwrap()
        else {
            return false;
        };
        let reading: Value = serde_json::from_str(&line).unwrap();
        let done = reading["json"]["i"].as_i64() == Some(want);
        printed.push(reading);
        if done {
            return true;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_client_lists_sends_and_resumes_a_cut_watch() {
    let broker = embedded_broker();
    let service = TestService::start_ready(config(&broker, &[])).await;
    let rust_client = service.client().await;
    let proxy = Proxy::start(service.addr).await;
    let target = proxy.addr.to_string();
    let device = TestDevice::connect(&broker, "device-node", None).await;

    // watch through the proxy. Live readings only until it is connected:
    // probes until the first one shows, then readings 0 and 1, a cut,
    // 2 to 4 sent while it is away; it must print each once, in order.
    let mut watch = client(&target, &["watch", "--device-id", "n1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let mut printed: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while printed.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node watch never went live"
        );
        device
            .publish("devices/n1/readings", r#"{"probe": 1}"#)
            .await;
        if let Ok(line) = tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
        {
            printed.push(serde_json::from_str(&line.unwrap().unwrap()).unwrap());
        }
    }
    for i in 0..2 {
        device
            .publish("devices/n1/readings", format!(r#"{{"i": {i}}}"#))
            .await;
    }
    let mut stderr = BufReader::new(watch.stderr.take().unwrap());
    let mut log = String::new();
    if !read_until(&mut lines, 1, &mut printed).await {
        let _ = watch.start_kill();
        let read = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut log);
        let _ = within("the watch's log", read).await;
        panic!("the watch ended: {log}");
    }
    let last_before_cut = printed.last().unwrap()["seq"].as_str().unwrap().to_owned();
    proxy.cut();
    for i in 2..5 {
        device
            .publish("devices/n1/readings", format!(r#"{{"i": {i}}}"#))
            .await;
    }
    let resumed = read_until(&mut lines, 4, &mut printed).await;
    watch.start_kill().unwrap();
    let _ = watch.wait().await;
    within(
        "the watch's log",
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut log),
    )
    .await
    .unwrap();
    assert!(resumed, "the watch ended: {log}");

    let is: Vec<i64> = printed
        .iter()
        .filter_map(|r| r["json"]["i"].as_i64())
        .collect();
    assert_eq!(is, [0, 1, 2, 3, 4], "every reading once, in order");
    let seqs: Vec<u64> = printed
        .iter()
        .map(|r| r["seq"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "no duplicates: {seqs:?}"
    );
    assert!(
        log.contains(&format!("reconnecting after seq {last_before_cut}")),
        "it resumed after the last reading it printed: {log}"
    );

    // list: every one of them, oldest first, in pages of two.
    let output = within(
        "node list",
        client(&target, &["list", "--device-id", "n1", "--page-size", "2"]).output(),
    )
    .await
    .unwrap();
    let listed = json_lines(&output);
    let listed_seqs: Vec<u64> = listed
        .iter()
        .map(|r| r["seq"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(listed_seqs.ends_with(&seqs), "{listed_seqs:?} {seqs:?}");

    // The same over gRPC-Web (what a browser speaks): same page, same order.
    let output = within(
        "node list over gRPC-Web",
        client(
            &target,
            &["list", "--transport", "grpc-web", "--device-id", "n1"],
        )
        .output(),
    )
    .await
    .unwrap();
    let web_seqs: Vec<u64> = json_lines(&output)
        .iter()
        .map(|r| r["seq"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(web_seqs, listed_seqs);

    // send: a round trip with a device that answers, and a refused id.
    let policy: ReplyPolicy = Arc::new(|_device: &str, envelope: &Value| {
        Some((
            Duration::ZERO,
            json!({"id": envelope["id"], "status": "ok", "result": {"got": envelope["params"]}}),
        ))
    });
    let _responder = Responder::start(&broker, "responder-node", policy).await;
    let output = within(
        "node send",
        client(
            &target,
            &[
                "send",
                "--device-id",
                "n1",
                "--command",
                "SET",
                "--params",
                r#"{"ms": 500}"#,
                "--reply-timeout-ms",
                "5000",
            ],
        )
        .output(),
    )
    .await
    .unwrap();
    let sent = &json_lines(&output)[0];
    assert_eq!(sent["reply"]["status"], "COMMAND_STATUS_OK", "{sent}");
    assert_eq!(sent["reply"]["result"]["got"]["ms"], 500.0);
    let output = client(
        &target,
        &[
            "send",
            "--transport",
            "grpc-web",
            "--device-id",
            "n1",
            "--command",
            "PING",
            "--reply-timeout-ms",
            "5000",
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(
        json_lines(&output)[0]["reply"]["status"],
        "COMMAND_STATUS_OK"
    );
    let output = client(&target, &["send", "--device-id", "a/b", "--command", "X"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("InvalidArgument: device_id"));
    drop(rust_client);
    service.stop().await;
}
