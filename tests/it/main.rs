//! One integration-test binary (like ripgrep's): every test talks to real parts — a real
//! MQTT broker (rumqttd in-process, mosquitto where installed), a real sled store on disk,
//! real TLS to the CHeKT simulator — and, where the process matters, the real
//! `chekt-agent` binary.

mod auth;
mod config;
mod kill;
mod pipeline;
mod provision;
mod support;
