//! The arrows of `lib.rs`'s picture, kept true: which modules may name
//! which. Data flows one way (MQTT → ingest → hub → gRPC); the hub reads
//! history through its own trait; nothing below the hub knows gRPC; the
//! buffer holds no encodings; persistent commands and device states reach
//! MQTT and the store through their own traits; the library knows nothing of clap. The
//! modules' `//!` docs promise these; an import that breaks one fails here,
//! named by file and line.

use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The Rust files at or under each of `paths` (relative to `src/`; a
/// module is its folder or its `.rs` file).
fn sources(paths: &[&str]) -> Vec<PathBuf> {
    let mut pending: Vec<PathBuf> = paths
        .iter()
        .flat_map(|p| [src().join(p), src().join(format!("{p}.rs"))])
        .filter(|p| p.exists())
        .collect();
    assert_eq!(
        pending.len(),
        paths.len(),
        "every module named exists: {paths:?}"
    );
    let mut found = Vec::new();
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("a readable folder") {
                pending.push(entry.expect("a folder entry").path());
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found
}

/// Fails naming every line of `files`, outside comments, that names one
/// of `forbidden`.
fn assert_never(files: &[PathBuf], forbidden: &[&str], why: &str) {
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("a readable source");
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            if forbidden.iter().any(|name| code.contains(name)) {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "{why}:\n{}", found.join("\n"));
}

#[test]
fn the_hub_knows_neither_mqtt_nor_the_store_nor_grpc() {
    assert_never(
        &sources(&["hub"]),
        &[
            "crate::store",
            "crate::mqtt",
            "crate::grpc",
            "tonic",
            "prost",
            "sqlx",
            "rumqttc",
        ],
        "the hub names MQTT, the store or gRPC",
    );
}

#[test]
fn nothing_below_the_grpc_side_knows_grpc() {
    assert_never(
        &sources(&[
            "buffer",
            "hub",
            "mqtt",
            "store",
            "replies",
            "topic",
            "config",
            "commands",
            "state",
            "json",
            "aggregate",
        ]),
        &["crate::grpc", "crate::proto", "tonic", "prost"],
        "a module below the gRPC side names gRPC",
    );
}

#[test]
fn persistent_commands_call_neither_mqtt_nor_the_store() {
    // The MQTT side and the store implement the commands' traits
    // (`Transport`, `CommandLog`); the commands never name them.
    assert_never(
        &sources(&["commands"]),
        &[
            "crate::store",
            "crate::mqtt",
            "crate::grpc",
            "sqlx",
            "rumqttc",
        ],
        "the commands name MQTT, the store or gRPC",
    );
}

#[test]
fn device_states_call_neither_mqtt_nor_the_store_nor_commands() {
    // The MQTT side and the store implement the states' traits
    // (`DesiredTransport`, `StateStorage`); the states never name them.
    assert_never(
        &sources(&["state"]),
        &[
            "crate::store",
            "crate::mqtt",
            "crate::grpc",
            "crate::commands",
            "crate::hub",
            "sqlx",
            "rumqttc",
        ],
        "the device states name MQTT, the store, gRPC, commands or the hub",
    );
}

#[test]
fn aggregation_is_plain_computation() {
    // Memory folds through it and the store mirrors it in SQL; it names
    // neither, nor what reads or serves them.
    assert_never(
        &sources(&["aggregate"]),
        &[
            "crate::hub",
            "crate::store",
            "crate::buffer",
            "crate::mqtt",
            "sqlx",
            "tokio",
        ],
        "aggregate names the hub, the store, the buffer or goes async",
    );
}

#[test]
fn the_buffer_is_plain_data_without_encodings() {
    assert_never(
        &sources(&["buffer"]),
        &[
            "crate::hub",
            "crate::store",
            "crate::mqtt",
            "tokio",
            "OnceLock<Bytes>",
        ],
        "the buffer reaches up, goes async or keeps encodings",
    );
}

#[test]
fn config_is_plain_data() {
    assert_never(
        &sources(&["config"]),
        &[
            "crate::mqtt",
            "crate::store",
            "crate::grpc",
            "crate::commands",
            "clap",
        ],
        "config names a part it configures",
    );
}

#[test]
fn the_library_knows_nothing_of_clap() {
    let library: Vec<PathBuf> = std::fs::read_dir(src())
        .expect("src/")
        .map(|e| e.expect("a folder entry").path())
        .filter(|p| !p.ends_with("cli") && !p.ends_with("main.rs"))
        .flat_map(|p| {
            let name = p.file_name().expect("a name").to_string_lossy();
            sources(&[name.trim_end_matches(".rs")])
        })
        .collect();
    assert!(library.len() > 20, "the library's files were found");
    assert_never(&library, &["clap"], "the library names clap");
}
