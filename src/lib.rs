//! chekt-agent: forwards a site's alarm, trouble and arming events from its local MQTT
//! broker to CHeKT's Partner Event API, one way, losing nothing.
//!
//! The flow is `ingest -> normalize -> spool -> upload`; see README's Architecture section
//! for the code map.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod event;
pub mod ingest;
pub mod jwt;
pub mod keys;
pub mod normalize;
pub mod pipeline;
pub mod provision;
pub mod site;
pub mod spool;
pub mod systemd;
pub mod upload;

#[cfg(feature = "simulator")]
pub mod demo;
#[cfg(feature = "simulator")]
pub mod simulator;
#[cfg(feature = "simulator")]
pub mod testbed;
