//! The command line's own checks: parsing, defaults, the old spellings of
//! duration flags, and flags that must not go together. (Flag errors seen
//! through the running binary are in the integration tests.)

use std::time::Duration;

use clap::Parser;
use devicehub::config::BrokerUrl;

use crate::cli::{Cli, Command};

#[test]
fn durations_take_humantime_and_the_old_seconds_flags_still_work() {
    let broker = BrokerUrl::from_addr("127.0.0.1:1883".parse().unwrap());
    let config = |args: &[&str]| {
        let cli = Cli::try_parse_from(std::iter::once("devicehub").chain(args.iter().copied()));
        cli.unwrap().serve.config(&broker).unwrap()
    };
    let defaults = config(&[]);
    assert_eq!(defaults.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(defaults.mqtt.keep_alive, Duration::from_secs(30));
    let new = config(&["--shutdown-timeout", "250ms", "--mqtt-keep-alive", "1m"]);
    assert_eq!(new.shutdown_timeout, Duration::from_millis(250));
    assert_eq!(new.mqtt.keep_alive, Duration::from_secs(60));
    let old = config(&[
        "--shutdown-timeout-secs",
        "7",
        "--mqtt-keep-alive-secs",
        "5",
    ]);
    assert_eq!(old.shutdown_timeout, Duration::from_secs(7));
    assert_eq!(old.mqtt.keep_alive, Duration::from_secs(5));
    for bad in ["500ms", "1500ms", "65536s"] {
        let parsed = Cli::try_parse_from(["devicehub", "--mqtt-keep-alive", bad]);
        assert!(parsed.is_err(), "{bad}");
    }
    let health = Cli::try_parse_from(["devicehub", "health", "--timeout-secs", "2"]).unwrap();
    let Some(Command::Health(args)) = health.command else {
        panic!("not health")
    };
    assert_eq!(args.timeout(), Duration::from_secs(2));
}

#[test]
fn defaults_and_fixed_topics_parse() {
    let cli = Cli::try_parse_from(["devicehub"]).unwrap();
    assert!(cli.command.is_none());
    let broker = BrokerUrl::from_addr("127.0.0.1:1883".parse().unwrap());
    let config = cli.serve.config(&broker).unwrap();
    assert_eq!(
        config.mqtt.readings_topic.subscription_filter(),
        "devices/+/readings"
    );
    assert!(config.mqtt.client_id.starts_with("devicehub-"));

    let poc = Cli::try_parse_from([
        "devicehub",
        "serve",
        "--readings-topic=poc/device/sensor",
        "--commands-topic=poc/device/control",
        "--fixed-device-id=device",
    ])
    .unwrap();
    let Some(Command::Serve(args)) = poc.command else {
        panic!("not serve")
    };
    let config = args.config(&broker).unwrap();
    assert_eq!(
        config.mqtt.commands_topic.topic_for("device"),
        "poc/device/control"
    );

    let wild = Cli::try_parse_from(["devicehub", "--commands-topic=a/+/{device_id}"]).unwrap();
    assert!(wild.serve.config(&broker).is_err());
    let persistent = Cli::try_parse_from(["devicehub", "--mqtt-persistent-session"]).unwrap();
    assert!(persistent.serve.config(&broker).is_err());
    let qos2 = [
        "devicehub",
        "--mqtt-persistent-session",
        "--mqtt-client-id=x",
        "--mqtt-subscribe-qos=2",
    ];
    assert!(Cli::try_parse_from(qos2)
        .unwrap()
        .serve
        .config(&broker)
        .is_err());
}

#[test]
fn the_dashboard_is_on_by_default_and_turned_off_with_false() {
    let broker = BrokerUrl::from_addr("127.0.0.1:1883".parse().unwrap());
    let dashboard = |args: &[&str]| {
        let cli = Cli::try_parse_from(std::iter::once("devicehub").chain(args.iter().copied()));
        cli.unwrap().serve.config(&broker).unwrap().dashboard
    };
    assert!(dashboard(&[]));
    assert!(dashboard(&["--dashboard"]));
    assert!(dashboard(&["--dashboard=true"]));
    assert!(!dashboard(&["--dashboard=false"]));
    assert!(!dashboard(&["--dashboard=0"]));
    assert!(Cli::try_parse_from(["devicehub", "--dashboard=maybe"]).is_err());
}
