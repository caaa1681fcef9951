//! NCCL between GPU workers (`--features nccl`): the library opened at run time ([`library`]),
//! a thin wrapper of our own over its raw functions ([`raw`]) and the
//! [`Communicator`](super::Communicator) it serves
//! ([`NcclCommunicator`]). The unique id goes through the control plane's key-value store
//! (`super::unique_id`), and a watchdog releases blocked collectives (`super::watchdog`).

pub mod communicator;
pub mod library;
pub mod raw;

pub use communicator::NcclCommunicator;
pub use raw::{library_version, new_unique_id, RawComm};

use super::unique_id::{exchange_unique_id, unique_id_key};
use anyhow::{Context, Result};
use candle_core::Device;
use coca_common::collective::{Collective, KeyValue};
use std::sync::Arc;
use std::time::Duration;

/// The NCCL communicator of a group whose host collective is `transport` (same members, same
/// order): member 0 makes the unique id and publishes it in `kv` under the generation's and
/// group's key, every member joins within `timeout`.
pub fn connect(
    kv: &dyn KeyValue,
    generation: u64,
    group: &str,
    device: &Device,
    transport: Arc<dyn Collective>,
    timeout: Duration,
) -> Result<NcclCommunicator> {
    let (rank, size) = (transport.rank(), transport.size());
    let key = unique_id_key(generation, group);
    let id = exchange_unique_id(kv, &key, rank == 0, new_unique_id, timeout)?;
    let raw = RawComm::init(&id, rank, size, timeout).with_context(|| {
        format!("joining the {group} group's NCCL communicator as {rank}/{size}")
    })?;
    NcclCommunicator::new(raw, device, group, transport)
}
