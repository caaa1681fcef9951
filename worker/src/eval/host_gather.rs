//! Gathering evaluation rows from every rank through host memory. Between ranks the rows travel
//! through the host transport anyway; gathered there, a rank whose share is empty (fewer items
//! than ranks) sends an empty host tensor, never a zero-size device allocation, which CUDA
//! refuses.

use crate::comm::HostTransport;
use crate::model::ops::collective::all_gather_rows;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use coca_common::collective::Collective;
use std::sync::Arc;

/// Every rank's `rows` `[n_r, d]` (on any device, or empty on the host) concatenated in rank
/// order, on `to`. One process keeps its rows as they are, moved to `to`.
pub fn gather_rows_via_host(
    rows: &Tensor,
    comm: &Arc<dyn Collective>,
    to: &Device,
) -> Result<Tensor> {
    if comm.size() == 1 {
        return Ok(rows.to_device(to)?);
    }
    let group = HostTransport::shared(comm.clone());
    let all = all_gather_rows(&rows.to_device(&Device::Cpu)?, &group).with_context(|| {
        format!(
            "gathering {} rows from every rank",
            rows.dim(0).unwrap_or(0)
        )
    })?;
    Ok(all.to_device(to)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::loopback_ring::on_loopback_ring;

    #[test]
    fn ranks_with_no_rows_send_an_empty_host_tensor() {
        // Three ranks, the last with nothing: every rank gets the first two's rows, in order.
        let got = on_loopback_ring("host-gather", 3, |rank, comm| {
            let n = [2usize, 1, 0][rank];
            let values: Vec<f32> = (0..n * 2).map(|i| (rank * 10 + i) as f32).collect();
            let rows = Tensor::from_vec(values, (n, 2), &Device::Cpu).unwrap();
            gather_rows_via_host(&rows, &comm, &Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        });
        let want = vec![vec![0.0, 1.0], vec![2.0, 3.0], vec![10.0, 11.0]];
        for (rank, rows) in got.iter().enumerate() {
            assert_eq!(rows, &want, "rank {rank}");
        }
    }
}
