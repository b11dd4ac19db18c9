//! The flags of persistent commands (SendCommand with a `ttl`): attempts,
//! the in-flight limit per device, the queue bounds and the retention.

use std::time::Duration;

use clap::Args;

use devicehub::config::CommandLimits;

/// How persistent commands are paced and bounded.
#[derive(Debug, Clone, Args)]
pub struct CommandArgs {
    /// How many times a persistent command is published in all: a SENT
    /// command whose device goes offline and comes back without replying
    /// is published again (same id), and FAILED once this many attempts
    /// went unanswered.
    #[arg(long, env = "DEVICEHUB_COMMAND_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub command_max_attempts: u32,

    /// Most persistent commands of one device published and not yet
    /// answered at once; the next waits (QUEUED) for a reply, expiry or
    /// cancel. 1: one at a time. Unset: no limit.
    #[arg(long, env = "DEVICEHUB_COMMAND_IN_FLIGHT_PER_DEVICE",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub command_in_flight_per_device: Option<u32>,

    /// Most persistent commands that have not ended (QUEUED or SENT), in
    /// all; more get RESOURCE_EXHAUSTED. Without a store, also the most
    /// ended commands kept in memory (the oldest are forgotten first).
    #[arg(long, env = "DEVICEHUB_MAX_QUEUED_COMMANDS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued_commands: u32,

    /// Most persistent commands that have not ended for one device; more
    /// get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DEVICEHUB_MAX_QUEUED_COMMANDS_PER_DEVICE", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queued_commands_per_device: u32,

    /// How long an ended persistent command is kept for GetCommand and
    /// ListCommands: a duration like 24h (the default) or 30m.
    #[arg(long, env = "DEVICEHUB_COMMAND_RETENTION", default_value = "24h",
          value_parser = humantime::parse_duration)]
    pub command_retention: Duration,
}

impl CommandArgs {
    pub fn limits(&self) -> CommandLimits {
        CommandLimits {
            max_attempts: self.command_max_attempts,
            in_flight_per_device: self.command_in_flight_per_device,
            max_queued: self.max_queued_commands as usize,
            max_queued_per_device: self.max_queued_commands_per_device as usize,
            retention: self.command_retention,
        }
    }
}
