//! [`Communicator`] over NCCL for flat buffers on the model's CUDA device: each operation is
//! issued on the device's stream (the one every kernel of the process runs on, see
//! `device.rs`), so it is ordered after the backward that produced the buffer with no host
//! copy. Results go to a fresh tensor (NCCL's out-of-place form, no extra copy), leaving tensors
//! that share the input's storage untouched, as [`super::super::HostTransport`] does. Host
//! buffers take a short trip to the device and back.
//!
//! Each operation waits for its stream (`cuStreamSynchronize`), so that a collective that can
//! never finish is seen by the watchdog (`super::super::watchdog`) as an operation in flight, and
//! released by its abort.

use super::raw::{RawComm, RawKind, RawOp};
use crate::comm::watchdog::Abort;
use crate::comm::{Communicator, FlatBuffer};
use anyhow::{bail, ensure, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr};
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Storage, Tensor};
use coca_common::collective::{Collective, ReduceOp};
use std::sync::Arc;

/// An NCCL communicator of one process group, on one CUDA device.
pub struct NcclCommunicator {
    raw: RawComm,
    device: Device,
    stream: Arc<CudaStream>,
    group: String,
    transport: Arc<dyn Collective>,
}

impl NcclCommunicator {
    /// `raw` on `device` (a CUDA device); `group` names it in errors; `transport` is the same
    /// group's host collective (for the model's collectives on activations).
    pub fn new(
        raw: RawComm,
        device: &Device,
        group: &str,
        transport: Arc<dyn Collective>,
    ) -> Result<Self> {
        let stream = device
            .as_cuda_device()
            .with_context(|| format!("the {group} group's NCCL communicator needs a CUDA device"))?
            .cuda_stream();
        Ok(Self {
            raw,
            device: device.clone(),
            stream,
            group: group.to_string(),
            transport,
        })
    }

    /// `input` (contiguous f32 on this device) → a fresh `out_len` tensor filled by `kind`.
    fn out_of_place(
        &self,
        input: &Tensor,
        out_len: usize,
        count: usize,
        kind: RawKind,
    ) -> Result<Tensor> {
        ensure!(
            input.dtype() == DType::F32 && input.is_contiguous(),
            "the {} group's NCCL {kind:?}: buffers must be contiguous float32",
            self.group
        );
        let out = Tensor::zeros(out_len, DType::F32, &self.device)?;
        let (storage, layout) = input.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            bail!(
                "the {} group's NCCL {kind:?}: the buffer is not on the CUDA device",
                self.group
            );
        };
        let slice = s.as_cuda_slice::<f32>()?;
        let start = layout.start_offset();
        let view = slice
            .try_slice(start..start + input.elem_count())
            .context("the input tensor's layout lies outside its storage")?;
        let (send, _sync) = view.device_ptr(&self.stream);
        out.inplace_op1(&Issue {
            comm: self,
            kind,
            send,
            count,
        })?;
        Ok(out)
    }

    /// Runs `f` on `buf` as a device tensor (host buffers go to the device and back).
    fn on_device(
        &self,
        buf: &FlatBuffer,
        f: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<FlatBuffer> {
        Ok(match buf {
            FlatBuffer::Device(t) => FlatBuffer::Device(f(t)?),
            FlatBuffer::Host(v) => {
                let t = Tensor::from_slice(v, v.len(), &self.device)?;
                FlatBuffer::Host(f(&t)?.to_vec1::<f32>()?)
            }
        })
    }
}

/// The collective as an in-place op on the output tensor (the way to reach its CUDA storage
/// mutably through candle).
struct Issue<'a> {
    comm: &'a NcclCommunicator,
    kind: RawKind,
    /// Device address of the input.
    send: u64,
    count: usize,
}

impl InplaceOp1 for Issue<'_> {
    fn name(&self) -> &'static str {
        "nccl-collective"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL collectives run on CUDA buffers only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let c = self.comm;
        let slice = storage.as_cuda_slice_mut::<f32>()?;
        let len = layout.shape().elem_count();
        let start = layout.start_offset();
        let mut view = slice
            .try_slice_mut(start..start + len)
            .ok_or_else(|| candle_core::Error::Msg("output layout outside its storage".into()))?;
        let (recv, _sync) = candle_core::cuda_backend::cudarc::driver::DevicePtrMut::device_ptr_mut(
            &mut view, &c.stream,
        );
        // SAFETY: `send` is the input tensor's storage, held alive (read guard) by the caller
        // for this call, `recv` this output's, both on `c.stream`'s device with the element
        // counts `kind` implies for `count` (checked by the callers); the stream is the
        // device's own and is synchronised below, before either buffer can be freed.
        let issued = unsafe {
            c.raw.enqueue(
                self.kind,
                self.send,
                recv,
                self.count,
                c.stream.cu_stream().cast(),
            )
        };
        let done = issued.and_then(|()| {
            c.stream
                .synchronize()
                .map_err(|e| anyhow::anyhow!("waiting for the collective: {e:?}"))
        });
        done.map_err(|e| {
            // The error goes on as candle's text: its type (a peer's failure) is noted first.
            crate::comm::peer_failure::note_collective_error(&e);
            candle_core::Error::Msg(format!("the {} group's {:?}: {e:#}", c.group, self.kind))
        })
    }
}

fn raw_op(op: ReduceOp) -> RawOp {
    match op {
        ReduceOp::Sum => RawOp::Sum,
        ReduceOp::Avg => RawOp::Avg,
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.raw.rank()
    }

    fn size(&self) -> usize {
        self.raw.size()
    }

    fn all_reduce(&self, buf: &mut FlatBuffer, op: ReduceOp) -> Result<()> {
        let n = buf.len();
        *buf = self.on_device(buf, |t| {
            self.out_of_place(t, n, n, RawKind::AllReduce(raw_op(op)))
        })?;
        Ok(())
    }

    fn all_gather(&self, input: &FlatBuffer) -> Result<FlatBuffer> {
        let n = input.len();
        self.on_device(input, |t| {
            self.out_of_place(t, n * self.size(), n, RawKind::AllGather)
        })
    }

    fn reduce_scatter(&self, input: &FlatBuffer, op: ReduceOp) -> Result<FlatBuffer> {
        let size = self.size();
        ensure!(
            input.len().is_multiple_of(size),
            "the {} group's reduce-scatter of {} elements over {size} members",
            self.group,
            input.len()
        );
        let n = input.len() / size;
        self.on_device(input, |t| {
            self.out_of_place(t, n, n, RawKind::ReduceScatter(raw_op(op)))
        })
    }

    fn broadcast(&self, buf: &mut FlatBuffer, root: usize) -> Result<()> {
        ensure!(
            root < self.size(),
            "the {} group's broadcast from member {root} of {}",
            self.group,
            self.size()
        );
        let n = buf.len();
        *buf = self.on_device(buf, |t| {
            self.out_of_place(t, n, n, RawKind::Broadcast(root))
        })?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut one = FlatBuffer::Device(Tensor::zeros(1, DType::F32, &self.device)?);
        self.all_reduce(&mut one, ReduceOp::Sum)
    }

    fn transport(&self) -> &Arc<dyn Collective> {
        &self.transport
    }
}

impl Abort for NcclCommunicator {
    fn abort(&self) {
        self.raw.abort();
    }
}
