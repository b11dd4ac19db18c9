//! What the scenarios share: their sizes, the broker, the service process,
//! MQTT publishers and bare subscribers, gRPC watchers and clients,
//! measuring, and the report's rows. Measures nothing on its own; which
//! numbers a scenario takes, and next to what baseline, is the scenario's.

pub mod broker;
pub mod grpc;
pub mod measure;
pub mod mqtt;
pub mod publish;
pub mod report;
pub mod service;
pub mod sizes;
