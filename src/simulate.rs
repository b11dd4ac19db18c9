//! `devicehub simulate`: devices that publish temperature/humidity readings,
//! carry out commands and reply to them. Each device is a real MQTT client
//! with its own connection, so the service sees what it would see in the
//! field.
//!
//! Commands a simulated device understands (the JSON envelope's `command`):
//! - `SET_INTERVAL` with `params.ms` (100 to 3600000): the reading interval;
//! - `TURN_ON_FAN` / `TURN_OFF_FAN`: the `fan` field of its readings;
//! - `PING`: replies `{"pong": true}`.
//!
//! Device state: each device subscribes to its desired state topic, applies
//! the keys of the delta it knows (`interval_ms`, 100 to 3600000, and
//! `fan`, true or false) from a document newer than the last it applied,
//! and reports them on its reported state topic; it reports both when it
//! connects, and after a command changed them.
//!
//! A command whose envelope's `expires_at` has passed is dropped, with no
//! reply. Anything else gets an error reply. `--silent-fraction` and
//! `--slow-fraction` make some devices never reply or reply late.
//!
//! Connection status, as devices in the field report it: each device
//! publishes `online` (retained) to its status topic when it connects, sets
//! a retained `offline` as its MQTT last will (the broker publishes it when
//! the connection breaks, e.g. when the simulator is killed), and publishes
//! `offline` itself when it stops cleanly.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::{
    config::{BrokerUrl, Credentials},
    topic::TopicTemplate,
};
use tokio_util::sync::CancellationToken;

/// Status payloads.
const ONLINE: &str = "online";
const OFFLINE: &str = "offline";

/// What [`run`] simulates, and where.
#[derive(Debug, Clone)]
pub struct SimulateConfig {
    /// The broker every device connects to.
    pub broker: BrokerUrl,
    /// TLS to the broker (`mqtts://`), the same for every device. `None`:
    /// plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The devices, in order: the silent ones first, then the slow ones.
    pub devices: Vec<SimulatedDevice>,
    /// Where each device publishes readings; no wildcards.
    pub readings_topic: TopicTemplate,
    /// Where each device receives commands.
    pub commands_topic: TopicTemplate,
    /// Where each device publishes its replies.
    pub replies_topic: TopicTemplate,
    /// Where each device publishes `online` and `offline`.
    pub status_topic: TopicTemplate,
    /// Where each device receives its desired state.
    pub desired_state_topic: TopicTemplate,
    /// Where each device reports its state.
    pub reported_state_topic: TopicTemplate,
    /// Time between two readings of one device.
    pub interval: Duration,
    /// Share of the devices (the first ones) that never reply, 0 to 1.
    pub silent_fraction: f64,
    /// Share of the devices (after the silent ones) that reply late, after
    /// [`SimulateConfig::slow_reply`], 0 to 1.
    pub slow_fraction: f64,
    /// How late slow devices reply.
    pub slow_reply: Duration,
}

/// One simulated device: its id (a valid device id) and broker login.
#[derive(Debug, Clone)]
pub struct SimulatedDevice {
    pub id: String,
    /// The device's own login, if the broker asks for one.
    pub credentials: Option<Credentials>,
}

/// How a device answers commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replies {
    Prompt,
    Late(Duration),
    Never,
}

/// Whether an envelope's `expires_at` (RFC 3339) has passed. One that does
/// not parse has not: the command is carried out, as before the field.
fn expired(expires_at: &str) -> bool {
    let Ok(timestamp) = expires_at.parse::<prost_types::Timestamp>() else {
        return false;
    };
    SystemTime::try_from(timestamp).is_ok_and(|at| at < SystemTime::now())
}

/// Runs the devices until `shutdown` is cancelled.
pub async fn run(config: SimulateConfig, shutdown: CancellationToken) {
    let count = config.devices.len();
    let silent = (count as f64 * config.silent_fraction).round() as usize;
    let slow = (count as f64 * config.slow_fraction).round() as usize;
    info!(devices = count, silent, slow, broker = %config.broker, "simulating devices");

    let mut tasks = Vec::new();
    for (n, simulated) in config.devices.into_iter().enumerate() {
        let replies_mode = if n < silent {
            Replies::Never
        } else if n < silent + slow {
            Replies::Late(config.slow_reply)
        } else {
            Replies::Prompt
        };
        let device_id = simulated.id;
        if replies_mode != Replies::Prompt {
            info!(device = device_id, replies = ?replies_mode, "device with unusual replies");
        }
        let device = Device {
            readings_topic: config.readings_topic.topic_for(&device_id),
            commands_topic: config.commands_topic.topic_for(&device_id),
            replies_topic: config.replies_topic.topic_for(&device_id),
            status_topic: config.status_topic.topic_for(&device_id),
            desired_state_topic: config.desired_state_topic.topic_for(&device_id),
            reported_state_topic: config.reported_state_topic.topic_for(&device_id),
            applied_version: 0,
            device_id,
            interval: config.interval,
            // Spread the devices' start so their readings do not come in bursts.
            phase: config.interval.mul_f64(n as f64 / count as f64),
            replies: replies_mode,
            fan: false,
        };
        let mut options = MqttOptions::new(
            format!("devicehub-sim-{}", device.device_id),
            &config.broker.host,
            config.broker.port,
        );
        crate::mqtt::log_in(
            &mut options,
            config.tls.as_ref(),
            simulated.credentials.as_ref(),
        );
        options.set_last_will(LastWill::new(
            &device.status_topic,
            OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
        tasks.push(tokio::spawn(device.run(options, shutdown.clone())));
    }
    for task in tasks {
        let _ = task.await;
    }
}

struct Device {
    device_id: String,
    readings_topic: String,
    commands_topic: String,
    replies_topic: String,
    status_topic: String,
    desired_state_topic: String,
    reported_state_topic: String,
    /// The version of the last desired state document applied.
    applied_version: i64,
    interval: Duration,
    phase: Duration,
    replies: Replies,
    fan: bool,
}

fn reading_ticker(start_in: Duration, period: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + start_in, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

impl Device {
    async fn run(mut self, options: MqttOptions, shutdown: CancellationToken) {
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let mut ticker = reading_ticker(self.phase, self.interval);
        let mut step: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    step += 1;
                    let payload = self.reading(step);
                    // try_publish: never block the loop that drives the client.
                    if let Err(error) = client.try_publish(&self.readings_topic, QoS::AtLeastOnce, false, payload) {
                        warn!(device = self.device_id, %error, "reading not queued");
                    }
                }
                event = eventloop.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Err(error) = client.try_subscribe(&self.commands_topic, QoS::AtLeastOnce) {
                            warn!(device = self.device_id, %error, "command subscription not queued");
                        }
                        if let Err(error) = client.try_subscribe(&self.desired_state_topic, QoS::AtLeastOnce) {
                            warn!(device = self.device_id, %error, "desired state subscription not queued");
                        }
                        if let Err(error) = client.try_publish(&self.status_topic, QoS::AtLeastOnce, true, ONLINE) {
                            warn!(device = self.device_id, %error, "online status not queued");
                        }
                        self.report(&client);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == self.desired_state_topic => {
                        if let Some(interval) = self.apply_desired(&p.payload) {
                            self.interval = interval;
                            ticker = reading_ticker(interval, interval);
                        }
                        self.report(&client);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // The simulator's output for a person: one line per command.
                        println!(
                            "{} received command on {}: {}",
                            self.device_id,
                            p.topic,
                            String::from_utf8_lossy(&p.payload)
                        );
                        let Some((reply, new_interval)) = self.carry_out(&p.payload) else { continue };
                        let changed = new_interval.is_some() || reply.pointer("/result/fan").is_some();
                        if let Some(interval) = new_interval {
                            self.interval = interval;
                            ticker = reading_ticker(interval, interval);
                        }
                        self.reply(&client, reply);
                        if changed {
                            self.report(&client);
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        warn!(device = self.device_id, %error, "MQTT connection failed; retrying in 1 s");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.cancelled() => break,
                        }
                    }
                }
            }
        }
        // A clean disconnect suppresses the last will: say it ourselves.
        let _ = client.try_publish(&self.status_topic, QoS::AtLeastOnce, true, OFFLINE);
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !matches!(
                eventloop.poll().await,
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
            ) {}
        })
        .await;
    }

    /// Carries out a command envelope; returns the reply, and the new reading
    /// interval if it changed. `None` for a payload that is not an envelope,
    /// or one that expired.
    fn carry_out(&mut self, payload: &[u8]) -> Option<(Value, Option<Duration>)> {
        let envelope: Value = serde_json::from_slice(payload).ok()?;
        let id = envelope.get("id")?.as_str()?.to_owned();
        let command = envelope.get("command")?.as_str()?;
        if let Some(expires_at) = envelope.get("expires_at").and_then(Value::as_str) {
            if expired(expires_at) {
                // Nobody waits for its reply, and acting now would surprise
                // whoever sent it: dropped, as devices should.
                info!(
                    device = self.device_id,
                    id, expires_at, "command arrived after it expired; not carried out"
                );
                return None;
            }
        }
        let params = envelope.get("params").cloned().unwrap_or(Value::Null);
        let ok = |result: Value| json!({"id": id, "status": "ok", "result": result});
        let error = |message: String| json!({"id": id, "status": "error", "message": message});
        Some(match command {
            "SET_INTERVAL" => match params.get("ms").and_then(Value::as_u64) {
                Some(ms @ 100..=3_600_000) => (
                    ok(json!({"interval_ms": ms})),
                    Some(Duration::from_millis(ms)),
                ),
                _ => (
                    error("SET_INTERVAL needs params.ms from 100 to 3600000".into()),
                    None,
                ),
            },
            "TURN_ON_FAN" | "TURN_OFF_FAN" => {
                self.fan = command == "TURN_ON_FAN";
                (ok(json!({"fan": self.fan})), None)
            }
            "PING" => (ok(json!({"pong": true})), None),
            other => (error(format!("unknown command {other:?}")), None),
        })
    }

    /// Applies a desired state document (`{"version", "desired", "delta"}`)
    /// newer than the last one applied: the delta's keys it knows. The new
    /// reading interval, if it changed.
    fn apply_desired(&mut self, payload: &[u8]) -> Option<Duration> {
        let document: Value = serde_json::from_slice(payload).ok()?;
        let version = document.get("version").and_then(Value::as_i64)?;
        if version <= self.applied_version {
            return None; // an older document (or one applied already)
        }
        self.applied_version = version;
        let delta = document.get("delta")?;
        println!(
            "{} received desired state {version}: {delta}",
            self.device_id
        );
        if let Some(fan) = delta.get("fan").and_then(Value::as_bool) {
            self.fan = fan;
        }
        match delta.get("interval_ms").and_then(Value::as_u64) {
            Some(ms @ 100..=3_600_000) => Some(Duration::from_millis(ms)),
            Some(ms) => {
                warn!(
                    device = self.device_id,
                    ms, "desired interval_ms out of range (100 to 3600000); not applied"
                );
                None
            }
            None => None,
        }
    }

    /// Reports what it now is: a merge patch of the keys it knows.
    fn report(&self, client: &AsyncClient) {
        let report = json!({
            "interval_ms": self.interval.as_millis() as u64,
            "fan": self.fan,
        });
        if let Err(error) = client.try_publish(
            &self.reported_state_topic,
            QoS::AtLeastOnce,
            false,
            report.to_string(),
        ) {
            warn!(device = self.device_id, %error, "reported state not queued");
        }
    }

    fn reply(&self, client: &AsyncClient, reply: Value) {
        let payload = reply.to_string();
        match self.replies {
            Replies::Never => {}
            Replies::Prompt => {
                if let Err(error) =
                    client.try_publish(&self.replies_topic, QoS::AtLeastOnce, false, payload)
                {
                    warn!(device = self.device_id, %error, "reply not queued");
                }
            }
            Replies::Late(delay) => {
                // Off the event loop task, so awaiting the client is fine.
                let (client, topic) = (client.clone(), self.replies_topic.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = client
                        .publish(topic, QoS::AtLeastOnce, false, payload)
                        .await;
                });
            }
        }
    }

    /// A plausible reading: slow sine waves with a per-device offset.
    fn reading(&self, step: u64) -> Vec<u8> {
        let offset = self.device_id.bytes().map(u64::from).sum::<u64>() % 10;
        let t = step as f64 / 10.0;
        // A running fan cools the device down a little.
        let fan = if self.fan { -1.5 } else { 0.0 };
        let temperature = 20.0 + offset as f64 * 0.5 + 2.0 * t.sin() + fan;
        let humidity = 45.0 + offset as f64 + 5.0 * (t / 2.0).cos();
        json!({
            "temperature": (temperature * 100.0).round() / 100.0,
            "humidity": (humidity * 100.0).round() / 100.0,
            "fan": self.fan,
            "step": step,
        })
        .to_string()
        .into_bytes()
    }
}
