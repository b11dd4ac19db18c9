//! Fuzz-style checks against the real service: thousands of random requests
//! and MQTT payloads. Every answer must be OK or a client error naming a
//! field, never INTERNAL/UNKNOWN, and the service must stay responsive.
//! Deterministic (seeded) so a failure replays.

use crate::common;

use common::{rng::Rng, *};
use devicehub::proto::{
    send_command_request::Payload, ListReadingsRequest, SendCommandRequest, WatchReadingsRequest,
};
use tonic::Code;

/// Random request fields for the fuzz test, on top of the shared [`Rng`].
trait Fuzz {
    fn string(&mut self) -> String;
    fn timestamp(&mut self) -> Option<prost_types::Timestamp>;
}

impl Fuzz for Rng {
    /// A string from pieces that matter to topics, ids and tokens.
    fn string(&mut self) -> String {
        const PIECES: &[&str] = &[
            "a",
            "d1",
            "/",
            "+",
            "#",
            "\0",
            "é",
            "devices",
            "readings",
            " ",
            "$SYS",
            "01",
            "ff",
            "{device_id}",
            "\u{1F600}",
            // What MQTT brokers refuse in topics (Mosquitto disconnects).
            "\u{1}",
            "\u{7f}",
            "\u{85}",
            "\u{fdd0}",
            "\u{fffe}",
            "\u{10ffff}",
        ];
        let len = self.below(8);
        (0..len).map(|_| *self.pick(PIECES)).collect()
    }

    fn timestamp(&mut self) -> Option<prost_types::Timestamp> {
        match self.below(4) {
            0 => None,
            1 => Some(prost_types::Timestamp {
                seconds: self.next() as i64,
                nanos: self.next() as i32,
            }),
            _ => Some(prost_types::Timestamp {
                seconds: self.below(4_000_000_000) as i64,
                nanos: self.below(1_000_000_000) as i32,
            }),
        }
    }
}

/// The codes a malformed request may get; anything else is a bug.
fn acceptable(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::OutOfRange
            | Code::Unavailable
            | Code::ResourceExhausted
            | Code::DeadlineExceeded
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_and_payloads_get_clear_answers() {
    random_requests_and_payloads(&embedded_broker()).await;
}

/// Mosquitto refuses topics the embedded broker accepts: the same requests
/// must never cost the service its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_never_break_the_link_to_mosquitto() {
    let mosquitto = Mosquitto::start();
    random_requests_and_payloads(&mosquitto.url).await;
    mosquitto.assert_one_unbroken_service_connection();
}

async fn random_requests_and_payloads(broker: &devicehub::config::BrokerUrl) {
    let broker = broker.clone();
    let service =
        TestService::start_ready(config(&broker, &["--buffer-max-readings", "200"])).await;
    let mut client = service.client().await;
    let device = TestDevice::connect(&broker, "device-fuzz", None).await;
    let mut rng = Rng(2026);

    // Random payloads, some of them almost JSON.
    let mut published = Vec::new();
    for _ in 0..300 {
        let payload = match rng.below(3) {
            0 => rng.bytes(2048),
            1 => {
                let mut json = br#"{"t": [1, 2.5e3, "x", {"n": null}], "s": "#.to_vec();
                json.truncate(rng.below(json.len() as u64 + 1) as usize);
                json
            }
            _ => "[".repeat(rng.below(300) as usize).into_bytes(),
        };
        device
            .publish(
                &format!("devices/fuzz{}/readings", rng.below(5)),
                payload.clone(),
            )
            .await;
        published.push(payload);
    }
    // The buffer keeps the newest 200, byte for byte.
    let newest: Vec<Vec<u8>> = published[100..].to_vec();
    eventually("the newest 200 payloads, stored raw", || {
        let mut client = client.clone();
        let newest = newest.clone();
        async move {
            let request = ListReadingsRequest {
                page_size: 1000,
                oldest_first: true,
                ..Default::default()
            };
            let page = client.list_readings(request).await.ok()?.into_inner();
            let stored: Vec<Vec<u8>> = page.readings.iter().map(|r| r.payload.to_vec()).collect();
            (stored == newest).then_some(())
        }
    })
    .await;

    let mut tokens = vec![String::new()];
    for i in 0..1500 {
        match rng.below(3) {
            0 => {
                let request = ListReadingsRequest {
                    device_id: if rng.below(2) == 0 {
                        format!("fuzz{}", rng.below(6))
                    } else {
                        rng.string()
                    },
                    topic_filter: if rng.below(2) == 0 {
                        "devices/+/readings".into()
                    } else {
                        rng.string()
                    },
                    start_time: rng.timestamp(),
                    end_time: rng.timestamp(),
                    page_size: [0, 1, 7, 1000, 1001, -1, i32::MAX, i32::MIN][rng.below(8) as usize],
                    page_token: match rng.below(3) {
                        0 => tokens[rng.below(tokens.len() as u64) as usize].clone(),
                        1 => rng.string(),
                        _ => (0..34)
                            .map(|_| char::from(b"0123456789abcdef"[rng.below(16) as usize]))
                            .collect(),
                    },
                    oldest_first: rng.below(2) == 0,
                };
                match client.list_readings(request).await {
                    Ok(page) => {
                        let page = page.into_inner();
                        if !page.next_page_token.is_empty() {
                            tokens.push(page.next_page_token);
                        }
                    }
                    Err(status) => assert!(acceptable(status.code()), "list #{i}: {status:?}"),
                }
            }
            1 => {
                let request = SendCommandRequest {
                    device_id: if rng.below(2) == 0 {
                        "d1".into()
                    } else {
                        rng.string()
                    },
                    command: rng.string(),
                    payload: match rng.below(3) {
                        0 => None,
                        1 => Some(Payload::RawPayload(rng.bytes(1024).into())),
                        _ => Some(Payload::Params(prost_types::Struct {
                            fields: [(
                                rng.string(),
                                prost_types::Value {
                                    kind: Some(prost_types::value::Kind::NumberValue(
                                        f64::from_bits(rng.next()),
                                    )),
                                },
                            )]
                            .into(),
                        })),
                    },
                    qos: [None, Some(0), Some(1), Some(2), Some(3), Some(u32::MAX)]
                        [rng.below(6) as usize],
                    // Persistent now and then, with any ttl, valid or not.
                    ttl: match rng.below(4) {
                        0 => Some(prost_types::Duration {
                            seconds: rng.next() as i64,
                            nanos: rng.next() as i32,
                        }),
                        1 => Some(prost_types::Duration {
                            seconds: 1 + rng.below(60) as i64,
                            nanos: 0,
                        }),
                        _ => None,
                    },
                    // Nobody answers here: short waits, or invalid ones.
                    reply_timeout: match rng.below(4) {
                        0 => Some(prost_types::Duration {
                            seconds: 0,
                            nanos: 1_000_000,
                        }),
                        1 => Some(prost_types::Duration {
                            seconds: rng.next() as i64,
                            nanos: rng.next() as i32,
                        }),
                        _ => None,
                    },
                };
                if let Err(status) = client.send_command(request).await {
                    assert!(acceptable(status.code()), "send #{i}: {status:?}");
                }
            }
            _ => {
                let request = WatchReadingsRequest {
                    device_id: rng.string(),
                    topic_filter: rng.string(),
                    after_seq: [None, Some(0), Some(1), Some(rng.next())][rng.below(4) as usize],
                    gap_policy: rng.below(4) as i32,
                };
                match client.watch_readings(request).await {
                    Ok(stream) => drop(stream),
                    Err(status) => assert!(acceptable(status.code()), "watch #{i}: {status:?}"),
                }
            }
        }
    }

    // Still responsive.
    let page = client
        .list_readings(ListReadingsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!page.readings.is_empty());
    service
        .wait_for_health(tonic_health::pb::health_check_response::ServingStatus::Serving)
        .await;
    service.stop().await;
}
