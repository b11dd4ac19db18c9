//! The web example in a real browser: headless Chromium (Debian's package)
//! loads examples/web from its own origin, calls the service cross-origin
//! over gRPC-Web, shows the newest and live readings of simulated devices,
//! and a command's round trip. scripts/test.sh installs Chromium and builds
//! the page (`npm ci`, `buf generate`, `npm run build`).

use crate::common;

use std::{process::Stdio, time::Duration};

use common::*;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

const WEB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/web");

/// Serves the page's two files on `listener`, as any static web server would.
async fn serve_page(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut request = vec![0; 4096];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&request[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let path = path.split('?').next().unwrap_or("/");
            let (file, content_type) = match path {
                "/" | "/index.html" => ("index.html", "text/html; charset=utf-8"),
                "/dist/main.js" => ("dist/main.js", "text/javascript"),
                _ => ("", ""),
            };
            let response = match std::fs::read(format!("{WEB_DIR}/{file}")) {
                Ok(body) if !file.is_empty() => {
                    let mut head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    head.extend(body);
                    head
                }
                _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = stream.write_all(&response).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_shows_live_readings_and_a_command_reply_in_chromium() {
    let chromium =
        which("chromium").expect("chromium (Debian package; scripts/test.sh installs it)");
    assert!(
        std::path::Path::new(&format!("{WEB_DIR}/dist/main.js")).exists()
            && std::path::Path::new(&format!("{WEB_DIR}/node_modules/puppeteer-core")).exists(),
        "the web example is not built: `npm ci && npm run build` in examples/web after `buf generate` (scripts/test.sh does it)"
    );
    // The page's origin, and the service that allows it.
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", page_listener.local_addr().unwrap());
    let server = tokio::spawn(serve_page(page_listener));
    let broker = embedded_broker();
    let service =
        TestService::start_ready(config(&broker, &["--cors-allowed-origins", &origin])).await;
    let mut simulator = tokio::process::Command::new(env!("CARGO_BIN_EXE_devicehub"))
        .args(["simulate", "--mqtt-url", &broker.to_string()])
        .args(["--devices", "2", "--interval-ms", "200"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = service.client().await;
    newest_reading_of(&client, "sim-1").await;

    let dir = tempdir::TempDir::new("browser");
    let screenshot = dir.path().join("page.png");
    let profile = dir.path().join("profile");
    let node = which("node").expect("node (Node.js 20)");
    // Longer than the script's own bounds (30 s per step, launch included),
    // so that a slow step fails there, with what the page logged, rather
    // than here with nothing.
    let output = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(node)
            .arg(format!("{WEB_DIR}/test/browser.mjs"))
            .env(
                "PAGE_URL",
                format!("{origin}/?service=http://{}", service.addr),
            )
            .env("CHROMIUM", &chromium)
            .env("SCREENSHOT", &screenshot)
            .env("PROFILE_DIR", &profile)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser test ends within its own timeouts")
    .unwrap();
    assert!(
        output.status.success(),
        "browser test failed (screenshot: {}): {}{}",
        screenshot.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["status"], "live", "{seen}");
    let live: Vec<&str> = seen["live"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(live.len() >= 2, "{seen}");
    assert!(live.iter().all(|l| l.contains(" sim-")), "{seen}");
    assert!(
        live.iter().any(|l| l.contains("temperature")),
        "readings decoded as JSON: {seen}"
    );
    assert_eq!(
        seen["reply"]["reply"]["status"], "COMMAND_STATUS_OK",
        "{seen}"
    );
    assert_eq!(seen["reply"]["reply"]["result"]["pong"], true, "{seen}");
    assert!(std::fs::metadata(&screenshot).is_ok_and(|m| m.len() > 0));

    simulator.start_kill().unwrap();
    let _ = simulator.wait().await;
    server.abort();
    service.stop().await;
}
