//! `devicehub simulate`: its options, and the library's [`SimulateConfig`]
//! they describe.

use std::time::Duration;

use clap::Args;
use devicehub::{
    config::BrokerUrl,
    simulate::{SimulateConfig, SimulatedDevice},
};

use super::{ConfigError, MqttLoginArgs, TopicArgs};

/// Options of `devicehub simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// MQTT broker the devices connect to, as mqtt://host[:port] (or
    /// mqtts:// for TLS).
    #[arg(
        long,
        env = "DEVICEHUB_MQTT_URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub mqtt_url: BrokerUrl,

    /// TLS and login of every device; in --mqtt-username and
    /// --mqtt-password-file, `{device_id}` stands for each device's id
    /// (brokers that give every device an account, like the shipped
    /// Mosquitto configuration, want `--mqtt-username '{device_id}'`, and a
    /// password of its own: `--mqtt-password-file 'passwords/{device_id}'`).
    #[command(flatten)]
    pub login: MqttLoginArgs,

    /// Number of simulated devices.
    #[arg(long, env = "DEVICEHUB_SIM_DEVICES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub devices: u32,

    /// Milliseconds between two readings of one device.
    #[arg(long, env = "DEVICEHUB_SIM_INTERVAL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub interval_ms: u64,

    /// Device ids are this prefix and a number: sim-1, sim-2...
    #[arg(long, env = "DEVICEHUB_SIM_DEVICE_PREFIX", default_value = "sim-")]
    pub device_prefix: String,

    /// Fraction of the devices (the first ones) that never reply to
    /// commands, to demonstrate reply timeouts.
    #[arg(long, env = "DEVICEHUB_SIM_SILENT_FRACTION", default_value_t = 0.0,
          value_parser = fraction)]
    pub silent_fraction: f64,

    /// Fraction of the devices (after the silent ones) that reply late, after
    /// --slow-reply-ms.
    #[arg(long, env = "DEVICEHUB_SIM_SLOW_FRACTION", default_value_t = 0.0,
          value_parser = fraction)]
    pub slow_fraction: f64,

    /// How late slow devices reply, in milliseconds.
    #[arg(long, env = "DEVICEHUB_SIM_SLOW_REPLY_MS", default_value_t = 3000)]
    pub slow_reply_ms: u64,

    #[command(flatten)]
    pub topics: TopicArgs,
}

impl SimulateArgs {
    /// The devices to simulate: topics checked (devices publish to them, so
    /// no wildcards), ids checked, each device's login read.
    pub fn config(&self) -> Result<SimulateConfig, ConfigError> {
        let readings_topic = self.topics.readings()?;
        let commands_topic = self.topics.commands()?;
        let replies_topic = self.topics.replies()?;
        let status_topic = self.topics.status()?;
        if readings_topic.has_wildcards() {
            return Err(ConfigError::Wildcards(
                "--readings-topic",
                readings_topic.to_string(),
            ));
        }
        let ids: Vec<String> = match readings_topic.fixed_device_id() {
            Some(id) => vec![id.to_owned()],
            None => (1..=self.devices)
                .map(|i| format!("{}{i}", self.device_prefix))
                .collect(),
        };
        for id in &ids {
            devicehub::topic::validate_device_id(id)
                .map_err(|e| ConfigError::Topic("--device-prefix", e))?;
        }
        let tls = self.login.tls(&self.mqtt_url)?;
        let devices = ids
            .into_iter()
            .map(|id| {
                let credentials = self.login.device_credentials(&id)?;
                Ok(SimulatedDevice { id, credentials })
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(SimulateConfig {
            broker: self.mqtt_url.clone(),
            tls,
            devices,
            readings_topic,
            commands_topic,
            replies_topic,
            status_topic,
            desired_state_topic: self.topics.desired_state()?,
            reported_state_topic: self.topics.reported_state()?,
            interval: Duration::from_millis(self.interval_ms),
            silent_fraction: self.silent_fraction,
            slow_fraction: self.slow_fraction,
            slow_reply: Duration::from_millis(self.slow_reply_ms),
        })
    }
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a fraction from 0 to 1")),
    }
}
