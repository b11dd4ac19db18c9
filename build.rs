//! Generates the gRPC code from `proto/` with `protox`, a protobuf compiler in
//! Rust, so that building needs no system `protoc`. The encoded descriptor set
//! (with imports and comments) is written next to the code for server reflection.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTO: &str = "proto/devicehub/v1/devicehub.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    let fds = protox::compile([PROTO], ["proto"])?;
    fs::write(
        out_dir.join("devicehub_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    // Messages and the client, as every generated client sees them.
    tonic_prost_build::configure()
        .build_server(false)
        // Payloads are shared with the buffer instead of copied.
        .bytes(".devicehub.v1.Reading.payload")
        .bytes(".devicehub.v1.SendCommandRequest.raw_payload")
        .compile_fds(fds.clone())?;

    // The server alone, in its own file, with the messages above, except
    // that the responses made of readings are sent as bytes encoded by the
    // service itself (a reading is encoded once and shared by every stream
    // that sends it). Clients see the same messages.
    let server_dir = out_dir.join("server");
    fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&server_dir)
        .extern_path(".devicehub.v1", "crate::proto")
        .extern_path(
            ".devicehub.v1.WatchReadingsResponse",
            "crate::grpc::EncodedWatchReadingsResponse",
        )
        .extern_path(
            ".devicehub.v1.ListReadingsResponse",
            "crate::grpc::EncodedListReadingsResponse",
        )
        .extern_path(
            ".devicehub.v1.ListDevicesResponse",
            "crate::grpc::EncodedListDevicesResponse",
        )
        .extern_path(
            ".devicehub.v1.GetDeviceResponse",
            "crate::grpc::EncodedGetDeviceResponse",
        )
        .compile_fds(fds)?;
    Ok(())
}
