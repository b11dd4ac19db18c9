//! The integration tests, one binary: a module per area, all sharing
//! [`common`] (the service in-process or as the `devicehub` binary, real
//! brokers, devices and clients). One binary links tonic, sqlx and the
//! support code once, where a binary per file linked them 21 times.
//!
//! `cargo test --test it` runs them all; `cargo test --test it store::`
//! one area; a test's name is its path (`it::store::...` in the output).
//! They run in parallel, across areas too: each test starts its own
//! service, brokers and databases on ephemeral ports, and nothing here
//! sets process-wide state (environment variables, a global subscriber)
//! that another test could see; what must be process-wide (logging, the
//! OTLP exporter, signal handling) is tested in a process of its own, the
//! `devicehub` binary. Embedded brokers cannot be stopped (rumqttd): each
//! test's keeps its threads until the binary ends, serving nobody.

mod common;

mod aggregate;
mod binary;
mod commands;
mod connections;
mod dashboard;
mod delivery;
mod devices;
mod embedded;
mod fuzz;
mod grpc_security;
mod grpc_web;
mod grpcurl;
mod layering;
mod lifecycle;
mod limits;
mod metrics;
mod mosquitto;
mod node_client;
mod poison;
mod python_client;
mod replicas;
mod secure_broker;
mod state;
mod store;
mod store_commands;
mod store_state;
mod traces;
