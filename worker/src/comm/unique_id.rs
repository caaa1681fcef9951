//! The rendezvous of a communicator's unique id (NCCL's 128-byte `ncclUniqueId`) through the
//! control plane's key-value store: the group's first member makes the id and publishes it under
//! a key scoped by the restart generation and the group, the others wait for it with a
//! deadline. Never a file or a fixed port; a restarted job (a new generation) never reads a dead
//! generation's id. Written over plain bytes, so it is tested without NCCL.

use anyhow::{ensure, Context, Result};
use coca_common::collective::KeyValue;
use std::time::Duration;

/// Bytes of a unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// A communicator's unique id, as bytes.
pub type UniqueId = [u8; UNIQUE_ID_BYTES];

/// The key-value key of the id of `group` (a label naming the group and its first member, as
/// the ring's: `data/0`) in restart generation `generation`.
pub fn unique_id_key(generation: u64, group: &str) -> String {
    format!("nccl/gen{generation}/{group}/unique-id")
}

/// The id every member of a group uses: member `0` (`is_root`) calls `make` and publishes the
/// result under `key`; the others wait up to `timeout` for it. Errors name the key.
pub fn exchange_unique_id(
    kv: &dyn KeyValue,
    key: &str,
    is_root: bool,
    make: impl FnOnce() -> Result<UniqueId>,
    timeout: Duration,
) -> Result<UniqueId> {
    if is_root {
        let id = make().context("making the communicator's unique id")?;
        kv.set(key, &id)
            .with_context(|| format!("publishing the unique id under {key:?}"))?;
        return Ok(id);
    }
    let bytes = kv.get(key, timeout).with_context(|| {
        format!("the group's first member did not publish its unique id {key:?} within {timeout:?}")
    })?;
    ensure!(
        bytes.len() == UNIQUE_ID_BYTES,
        "the unique id under {key:?} has {} bytes, expected {UNIQUE_ID_BYTES}",
        bytes.len()
    );
    let mut id = [0u8; UNIQUE_ID_BYTES];
    id.copy_from_slice(&bytes);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coca_common::collective::MemoryKeyValue;
    use std::sync::Arc;

    fn id(seed: u8) -> UniqueId {
        std::array::from_fn(|i| seed.wrapping_add(i as u8))
    }

    #[test]
    fn every_member_gets_the_roots_id() {
        let kv = Arc::new(MemoryKeyValue::new());
        let key = unique_id_key(3, "data/0");
        let waiters: Vec<_> = (1..4)
            .map(|_| {
                let (kv, key) = (kv.clone(), key.clone());
                std::thread::spawn(move || {
                    exchange_unique_id(
                        kv.as_ref(),
                        &key,
                        false,
                        || panic!("only the root makes the id"),
                        Duration::from_secs(10),
                    )
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        let root = exchange_unique_id(kv.as_ref(), &key, true, || Ok(id(7)), Duration::ZERO);
        assert_eq!(root.unwrap(), id(7));
        for w in waiters {
            assert_eq!(w.join().unwrap().unwrap(), id(7));
        }
    }

    #[test]
    fn keys_are_scoped_by_generation_and_group() {
        let keys = [
            unique_id_key(0, "data/0"),
            unique_id_key(1, "data/0"),
            unique_id_key(0, "data/2"),
            unique_id_key(0, "tensor/0"),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        // A member of generation 1 never takes generation 0's (dead) id.
        let kv = MemoryKeyValue::new();
        kv.set(&keys[0], &id(1)).unwrap();
        let e = exchange_unique_id(
            &kv,
            &keys[1],
            false,
            || Ok(id(2)),
            Duration::from_millis(30),
        );
        let msg = format!("{:#}", e.unwrap_err());
        assert!(
            msg.contains(&keys[1]) && msg.contains("did not publish"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_root_or_a_bad_id_is_an_error_naming_the_key() {
        let kv = MemoryKeyValue::new();
        let key = unique_id_key(0, "world/0");
        kv.set(&key, b"short").unwrap();
        let e = exchange_unique_id(&kv, &key, false, || Ok(id(0)), Duration::from_secs(1));
        let msg = format!("{:#}", e.unwrap_err());
        assert!(msg.contains("5 bytes") && msg.contains(&key), "{msg}");
        let e = exchange_unique_id(
            &kv,
            &key,
            true,
            || anyhow::bail!("ncclGetUniqueId: no network interface"),
            Duration::ZERO,
        );
        assert!(format!("{:#}", e.unwrap_err()).contains("no network interface"));
    }
}
