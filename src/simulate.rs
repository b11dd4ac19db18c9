//! `devicehub simulate`: devices that publish temperature/humidity readings
//! and print the commands they receive. Each device is a real MQTT client with
//! its own connection, so the service sees what it would see in the field.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tracing::{info, warn};

use crate::{
    config::{ConfigError, SimulateArgs},
    shutdown::Shutdown,
};

/// Runs the devices until `shutdown` fires.
pub async fn run(args: SimulateArgs, shutdown: Shutdown) -> Result<(), ConfigError> {
    let readings = args.topics.readings()?;
    let commands = args.topics.commands()?;
    if readings.has_wildcards() {
        return Err(ConfigError::Wildcards(
            "--readings-topic",
            readings.to_string(),
        ));
    }
    let ids: Vec<String> = match readings.fixed_device_id() {
        Some(id) => vec![id.to_owned()],
        None => (1..=args.devices)
            .map(|i| format!("{}{i}", args.device_prefix))
            .collect(),
    };
    for id in &ids {
        crate::topic::validate_device_id(id)
            .map_err(|e| ConfigError::Topic("--device-prefix", e))?;
    }
    info!(devices = ids.len(), broker = %args.mqtt_url, "simulating devices");

    let mut tasks = Vec::new();
    for (n, device_id) in ids.into_iter().enumerate() {
        let device = Device {
            readings_topic: readings.topic_for(&device_id),
            commands_topic: commands.topic_for(&device_id),
            device_id,
            interval: Duration::from_millis(args.interval_ms),
            // Spread the devices' start so their readings do not come in bursts.
            phase: Duration::from_millis(args.interval_ms * n as u64 / u64::from(args.devices)),
        };
        let options = MqttOptions::new(
            format!("devicehub-sim-{}", device.device_id),
            &args.mqtt_url.host,
            args.mqtt_url.port,
        );
        tasks.push(tokio::spawn(device.run(options, shutdown.clone())));
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

struct Device {
    device_id: String,
    readings_topic: String,
    commands_topic: String,
    interval: Duration,
    phase: Duration,
}

impl Device {
    async fn run(self, options: MqttOptions, mut shutdown: Shutdown) {
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + self.phase, self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut step: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.recv() => break,
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
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // The simulator's output for a person: one line per command.
                        println!(
                            "{} received command on {}: {}",
                            self.device_id,
                            p.topic,
                            String::from_utf8_lossy(&p.payload)
                        );
                    }
                    Ok(_) => {}
                    Err(error) => {
                        warn!(device = self.device_id, %error, "MQTT connection failed; retrying in 1 s");
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = shutdown.recv() => break,
                        }
                    }
                }
            }
        }
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !matches!(
                eventloop.poll().await,
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
            ) {}
        })
        .await;
    }

    /// A plausible reading: slow sine waves with a per-device offset.
    fn reading(&self, step: u64) -> Vec<u8> {
        let offset = self.device_id.bytes().map(u64::from).sum::<u64>() % 10;
        let t = step as f64 / 10.0;
        let temperature = 20.0 + offset as f64 * 0.5 + 2.0 * t.sin();
        let humidity = 45.0 + offset as f64 + 5.0 * (t / 2.0).cos();
        serde_json::json!({
            "temperature": (temperature * 100.0).round() / 100.0,
            "humidity": (humidity * 100.0).round() / 100.0,
            "step": step,
        })
        .to_string()
        .into_bytes()
    }
}
