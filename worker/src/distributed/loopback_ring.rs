//! Test support: ranks as threads of one process, joined by a ring over loopback, so a unit
//! test can run code that takes a `Collective` as every rank of a small job.

use coca_common::collective::ring::RingCollective;
use coca_common::collective::{Collective, MemoryKeyValue};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// Runs `each(rank, collective)` on `world` threads joined by a loopback ring named `name`;
/// the results in rank order.
pub fn on_loopback_ring<T: Send>(
    name: &str,
    world: usize,
    each: impl Fn(usize, Arc<dyn Collective>) -> T + Sync,
) -> Vec<T> {
    let kv = MemoryKeyValue::new();
    let members: Vec<usize> = (0..world).collect();
    std::thread::scope(|s| {
        let joins: Vec<_> = members
            .iter()
            .map(|&rank| {
                let (kv, members, each) = (&kv, &members, &each);
                s.spawn(move || {
                    let ring = RingCollective::connect(
                        name,
                        members,
                        rank,
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                        kv,
                        b"test token",
                        std::time::Duration::from_secs(30),
                    )
                    .expect("a loopback ring connects");
                    each(rank, Arc::new(ring))
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("a rank's thread panicked"))
            .collect()
    })
}
