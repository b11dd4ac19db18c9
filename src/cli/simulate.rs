//! `devicehub simulate`: its options.

use clap::Args;

use super::*;
use crate::config::BrokerUrl;

#[cfg(feature = "simulator")]
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

#[cfg(feature = "simulator")]
fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a fraction from 0 to 1")),
    }
}
