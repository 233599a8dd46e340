//! Additive attention masks (0 where a query sees a key, `-inf` where not),
//! built once per forward pass and shared by its layers.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{Device, DeviceLocation, Result, Tensor};

/// The last causal mask built, keyed by its `(l, n)` shape and device: every
/// layer of a step needs the same one, so it is built once per step, not
/// once per layer (and once more where layers change device).
#[derive(Debug, Default)]
pub struct CausalMasks(Mutex<Option<(usize, usize, DeviceLocation, Tensor)>>);

impl CausalMasks {
    /// The `(l, n)` additive mask: 0 where query `i` may see key `j`, `-inf`
    /// elsewhere, for queries that are the last `l` of `n` positions.
    pub fn get(&self, l: usize, n: usize, device: &Device) -> Result<Tensor> {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cl, cn, location, mask)) = cached.as_ref() {
            if (*cl, *cn, *location) == (l, n, device.location()) {
                return Ok(mask.clone());
            }
        }
        let mask = causal_mask(l, n, device)?;
        *cached = Some((l, n, device.location(), mask.clone()));
        Ok(mask)
    }
}

pub(crate) fn causal_mask(l: usize, n: usize, device: &Device) -> Result<Tensor> {
    let past = n - l;
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| {
            (0..n).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (l, n), device)
}

/// Everything that shapes an execution block's mask. All layers of a step
/// share it, so the mask is built once per step and sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct MaskGeometry {
    pub first_query: usize,
    pub queries: usize,
    /// Columns always visible: sinks and retrieved blocks.
    pub fixed: usize,
    pub global_recent_start: usize,
    pub global_recent: usize,
    pub local_start: usize,
    pub local_len: usize,
    pub n_local: usize,
}

impl MaskGeometry {
    /// `(queries, columns)`: 0 where query `i` sees the column, `-inf` where
    /// not. A recent token is seen globally once it is `n_local` or more
    /// tokens back, locally while it is fewer, and never from the future.
    fn build(&self, device: &Device) -> Result<Tensor> {
        let cols = self.fixed + self.global_recent + self.local_len;
        let mut mask = vec![0f32; self.queries * cols];
        for i in 0..self.queries {
            let pos = self.first_query + i;
            let row = &mut mask[i * cols..(i + 1) * cols];
            for (c, m) in row[self.fixed..self.fixed + self.global_recent]
                .iter_mut()
                .enumerate()
            {
                if pos - (self.global_recent_start + c) < self.n_local {
                    *m = f32::NEG_INFINITY;
                }
            }
            for (c, m) in row[self.fixed + self.global_recent..]
                .iter_mut()
                .enumerate()
            {
                let key = self.local_start + c;
                if key > pos || pos - key >= self.n_local {
                    *m = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(mask, (self.queries, cols), device)
    }
}

/// Masks of the current forward pass (one prompt chunk or decode step of
/// every sequence in it), one per geometry and device: the layers of a pass
/// share them, and layers may sit on different devices.
#[derive(Debug, Default)]
pub struct MaskCache(Mutex<HashMap<(MaskGeometry, DeviceLocation), Tensor>>);

impl MaskCache {
    pub(crate) fn get(&self, geometry: &MaskGeometry, device: &Device) -> Result<Tensor> {
        let mut masks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (*geometry, device.location());
        if let Some(mask) = masks.get(&key) {
            return Ok(mask.clone());
        }
        let mask = geometry.build(device)?;
        masks.insert(key, mask.clone());
        Ok(mask)
    }

    /// Forgets the masks of the previous pass.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Masks held.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no mask is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
