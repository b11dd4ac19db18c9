//! The topic layout, shared by `serve` and `simulate`.

use clap::Args;

use devicehub::topic::TopicTemplate;

use super::ConfigError;

/// Topic layout, shared by `serve` and `simulate`.
#[derive(Debug, Clone, Args)]
pub struct TopicArgs {
    /// Topic devices publish readings to. `{device_id}` marks the level that
    /// holds the device id; other levels may be `+` or `#`.
    #[arg(
        long,
        env = "DEVICEHUB_READINGS_TOPIC",
        default_value = "devices/{device_id}/readings"
    )]
    pub readings_topic: String,

    /// Topic commands are published to, with a `{device_id}` level.
    #[arg(
        long,
        env = "DEVICEHUB_COMMANDS_TOPIC",
        default_value = "devices/{device_id}/commands"
    )]
    pub commands_topic: String,

    /// Topic devices publish command replies to, with a `{device_id}` level.
    /// Replies are also buffered like readings.
    #[arg(
        long,
        env = "DEVICEHUB_REPLIES_TOPIC",
        default_value = "devices/{device_id}/replies"
    )]
    pub replies_topic: String,

    /// Topic devices publish their connection status to, with a
    /// `{device_id}` level: `online` (retained) when they connect, `offline`
    /// as their MQTT last will; `{"status": "online"}` is accepted too.
    /// Status messages are also buffered like readings.
    #[arg(
        long,
        env = "DEVICEHUB_STATUS_TOPIC",
        default_value = "devices/{device_id}/status"
    )]
    pub status_topic: String,

    /// Topic devicehub publishes each device's desired state to, retained,
    /// QoS 1, with a `{device_id}` level: `{"version": N, "desired": {...},
    /// "delta": {...}}` after every change of desired (UpdateDesiredState).
    #[arg(
        long,
        env = "DEVICEHUB_DESIRED_STATE_TOPIC",
        default_value = "devices/{device_id}/state/desired"
    )]
    pub desired_state_topic: String,

    /// Topic devices publish their reported state to, with a `{device_id}`
    /// level: a JSON merge patch (RFC 7386) of what they now are.
    #[arg(
        long,
        env = "DEVICEHUB_REPORTED_STATE_TOPIC",
        default_value = "devices/{device_id}/state/reported"
    )]
    pub reported_state_topic: String,

    /// Device id for topic templates without `{device_id}`: a single device
    /// on fixed topics, e.g. `--readings-topic poc/device/sensor
    /// --commands-topic poc/device/control --fixed-device-id device`.
    #[arg(long, env = "DEVICEHUB_FIXED_DEVICE_ID")]
    pub fixed_device_id: Option<String>,
}

impl TopicArgs {
    pub fn readings(&self) -> Result<TopicTemplate, ConfigError> {
        TopicTemplate::parse(&self.readings_topic, self.fixed_device_id.as_deref())
            .map_err(|e| ConfigError::Topic("--readings-topic", e))
    }

    /// The commands template; it must be a publishable topic.
    pub fn commands(&self) -> Result<TopicTemplate, ConfigError> {
        publishable(
            "--commands-topic",
            &self.commands_topic,
            self.fixed_device_id.as_deref(),
        )
    }

    /// The status template; devices publish to it, so no wildcards.
    pub fn status(&self) -> Result<TopicTemplate, ConfigError> {
        publishable(
            "--status-topic",
            &self.status_topic,
            self.fixed_device_id.as_deref(),
        )
    }

    /// The replies template; devices publish to it, so no wildcards.
    pub fn replies(&self) -> Result<TopicTemplate, ConfigError> {
        publishable(
            "--replies-topic",
            &self.replies_topic,
            self.fixed_device_id.as_deref(),
        )
    }
}

impl TopicArgs {
    /// The desired state template; it must be a publishable topic.
    pub fn desired_state(&self) -> Result<TopicTemplate, ConfigError> {
        publishable(
            "--desired-state-topic",
            &self.desired_state_topic,
            self.fixed_device_id.as_deref(),
        )
    }

    /// The reported state template; devices publish to it, so no wildcards.
    pub fn reported_state(&self) -> Result<TopicTemplate, ConfigError> {
        publishable(
            "--reported-state-topic",
            &self.reported_state_topic,
            self.fixed_device_id.as_deref(),
        )
    }
}

fn publishable(
    flag: &'static str,
    template: &str,
    fixed_device_id: Option<&str>,
) -> Result<TopicTemplate, ConfigError> {
    let template =
        TopicTemplate::parse(template, fixed_device_id).map_err(|e| ConfigError::Topic(flag, e))?;
    if template.has_wildcards() {
        return Err(ConfigError::Wildcards(flag, template.to_string()));
    }
    Ok(template)
}
