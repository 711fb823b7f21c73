//! The device side over the network: the update client for the server's dialects, the
//! Linux device agent (`otaforge agent`) and the fleet simulator (`otaforge sim`).

#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod device;
pub mod http;
pub mod sim;
