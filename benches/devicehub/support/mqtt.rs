//! Bare MQTT subscribers, the baselines' consumers: in the harness's
//! runtime ([`BareSubscriber`]) or in a process of their own
//! ([`BareSubscriberProcess`], the harness re-executed with
//! `--bare-subscriber-process`), counting what arrives, when the last did,
//! and how long each took from its publisher.

use std::{
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use devicehub::config::BrokerUrl;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

use super::{measure::bounded, publish::sent_at};

/// A bare MQTT subscriber: the baseline consumer.
pub struct BareSubscriber {
    pub count: Arc<AtomicU64>,
    pub last: Arc<Mutex<Option<Instant>>>,
    pub latencies: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BareSubscriber {
    pub async fn start(
        broker: &BrokerUrl,
        id: &str,
        filter: &str,
        qos: QoS,
        epoch: Instant,
    ) -> Self {
        let mut options = MqttOptions::new(id, &broker.host, broker.port);
        options
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_inflight(1000);
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (count, last, latencies) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(Mutex::new(None)),
            Arc::new(Mutex::new(Vec::new())),
        );
        let (c, l, lat) = (count.clone(), last.clone(), latencies.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        client.try_subscribe(&filter, qos).unwrap()
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let now = Instant::now();
                        // A stamp from another run's epoch (a message the
                        // broker still held) is no latency of this one.
                        let latency = sent_at(&p.payload)
                            .and_then(|sent| ((now - epoch).as_nanos() as u64).checked_sub(sent));
                        if let Some(latency) = latency {
                            lat.lock().unwrap().push(latency);
                        }
                        c.fetch_add(1, Ordering::Relaxed);
                        *l.lock().unwrap() = Some(now);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        bounded("the bare subscriber to subscribe", ready_rx)
            .await
            .unwrap();
        Self {
            count,
            last,
            latencies,
            task,
        }
    }
}

impl Drop for BareSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The argument that makes this program a [`BareSubscriberProcess`]
/// (`args.rs` parses it, hidden).
const BARE_SUBSCRIBER_PROCESS: &str = "--bare-subscriber-process";

/// A bare MQTT subscriber in a process of its own, like the service: the
/// ingest baseline, so that both sides cross the same process boundary and
/// neither shares a runtime with the broker and the publishers.
pub struct BareSubscriberProcess {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl BareSubscriberProcess {
    pub async fn start(broker: &BrokerUrl, id: &str, filter: &str, qos: QoS) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("this program"))
            .args([
                BARE_SUBSCRIBER_PROCESS,
                &broker.host,
                &broker.port.to_string(),
            ])
            .args([&(qos as u8).to_string(), filter, id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("starting a bare subscriber process");
        let stdin = child.stdin.take().expect("piped");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let ready = bounded("a bare subscriber process", lines.next_line()).await;
        assert_eq!(ready.ok().flatten().as_deref(), Some("ready"));
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Readings received so far, and when the last one arrived.
    pub async fn received(&mut self) -> (u64, Option<Instant>) {
        self.stdin
            .write_all(b"?\n")
            .await
            .expect("asking the subscriber");
        let line = bounded("the subscriber's answer", self.lines.next_line())
            .await
            .ok()
            .flatten()
            .expect("an answer");
        let now = Instant::now();
        let (count, age) = line.split_once(' ').expect("count and age");
        let age = age.parse().ok().map(Duration::from_nanos);
        (count.parse().expect("a count"), age.map(|age| now - age))
    }

    pub async fn stop(mut self) {
        drop(self.stdin); // it exits at the end of its input
        if bounded("a bare subscriber to exit", self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The child side of [`BareSubscriberProcess`]: args are host, port, QoS,
/// filter, client id. Prints `ready` once subscribed, then for each line read
/// `<count> <nanoseconds since the last arrival, or ->`.
pub fn bare_subscriber_process(args: &[String]) {
    let [host, port, qos, filter, id] = args else {
        panic!("{BARE_SUBSCRIBER_PROCESS} host port qos filter id");
    };
    let broker = BrokerUrl {
        host: host.clone(),
        port: port.parse().expect("a port"),
        tls: false,
    };
    let qos = rumqttc::qos(qos.parse().expect("a QoS")).expect("a QoS");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let bare = BareSubscriber::start(&broker, id, filter, qos, Instant::now()).await;
        let mut stdout = tokio::io::stdout();
        stdout.write_all(b"ready\n").await.expect("stdout");
        stdout.flush().await.expect("stdout");
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            let count = bare.count.load(Ordering::Relaxed);
            let age = match *bare.last.lock().unwrap() {
                Some(last) => last.elapsed().as_nanos().to_string(),
                None => "-".to_owned(),
            };
            stdout
                .write_all(format!("{count} {age}\n").as_bytes())
                .await
                .expect("stdout");
            stdout.flush().await.expect("stdout");
        }
    });
}
