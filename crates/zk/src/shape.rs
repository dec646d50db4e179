//! Layer shapes: which inputs and which weight each output neuron uses (dense, convolution,
//! depthwise convolution for average pooling; the window of a max pooling; the one input of an
//! elementwise table activation), and how neurons are grouped into circuit blocks.

use serde::{Deserialize, Serialize};

/// A 2-d convolution over a `[channels, h, w]` input (batch 1, NCHW order, no dilation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConvShape {
    pub in_channels: u32,
    pub in_h: u32,
    pub in_w: u32,
    pub out_channels: u32,
    /// `[kh, kw]`
    pub kernel: [u32; 2],
    /// `[sh, sw]`
    pub stride: [u32; 2],
    /// `[top, left, bottom, right]`, zero padding.
    pub pads: [u32; 4],
    /// Each output channel reads only its own input channel (average and max pooling).
    pub depthwise: bool,
}

impl ConvShape {
    pub fn out_h(&self) -> u32 {
        (self.in_h + self.pads[0] + self.pads[2]).saturating_sub(self.kernel[0])
            / self.stride[0].max(1)
            + 1
    }

    pub fn out_w(&self) -> u32 {
        (self.in_w + self.pads[1] + self.pads[3]).saturating_sub(self.kernel[1])
            / self.stride[1].max(1)
            + 1
    }

    pub fn inputs(&self) -> usize {
        self.in_channels as usize * self.in_h as usize * self.in_w as usize
    }

    pub fn outputs(&self) -> usize {
        self.out_channels as usize * self.out_h() as usize * self.out_w() as usize
    }

    pub fn weight_count(&self) -> usize {
        let k = self.kernel[0] as usize * self.kernel[1] as usize;
        if self.depthwise {
            self.out_channels as usize * k
        } else {
            self.out_channels as usize * self.in_channels as usize * k
        }
    }

    /// Whether every padding is smaller than the kernel along its axis (as ONNX requires): then
    /// every window has at least one in-bounds element (needed by max pooling).
    pub fn pads_within_kernel(&self) -> bool {
        self.pads[0] < self.kernel[0]
            && self.pads[2] < self.kernel[0]
            && self.pads[1] < self.kernel[1]
            && self.pads[3] < self.kernel[1]
    }

    /// Whether the shape is well formed (and small enough to plan without overflow).
    pub fn is_valid(&self) -> bool {
        let dims = [
            self.in_channels,
            self.in_h,
            self.in_w,
            self.out_channels,
            self.kernel[0],
            self.kernel[1],
            self.stride[0],
            self.stride[1],
        ];
        dims.iter().all(|&d| (1..=4096).contains(&d))
            && self
                .pads
                .iter()
                .all(|&p| p < self.kernel[0].max(self.kernel[1]))
            && self.kernel[0] <= self.in_h + self.pads[0] + self.pads[2]
            && self.kernel[1] <= self.in_w + self.pads[1] + self.pads[3]
            && (!self.depthwise || self.in_channels == self.out_channels)
    }
}

/// The kind of a layer: linear (dense or convolution, with weights and a rescale) or, from spec
/// version 2, a max pooling or an elementwise table activation (no weights, no rescale).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Fully connected; weights row-major `[outputs][inputs]`.
    #[default]
    Dense,
    /// Convolution; weights `[out_c][in_c][kh][kw]` (`[c][kh][kw]` when depthwise).
    Conv(ConvShape),
    /// Max pooling over the in-bounds part of each window (`depthwise`, padding ignored as ONNX
    /// pads with `-inf`); output `o` is the max of [`LayerKind::connections`]`(n, o)`.
    MaxPool(ConvShape),
    /// Elementwise logistic sigmoid by table lookup.
    Sigmoid,
    /// Elementwise hyperbolic tangent by table lookup.
    Tanh,
}

impl LayerKind {
    pub fn is_dense(&self) -> bool {
        matches!(self, LayerKind::Dense)
    }

    /// Dense and convolution layers: weights, accumulation and a rescale.
    pub fn is_linear(&self) -> bool {
        matches!(self, LayerKind::Dense | LayerKind::Conv(_))
    }

    /// Elementwise activations computed by a lookup table.
    pub fn is_table(&self) -> bool {
        matches!(self, LayerKind::Sigmoid | LayerKind::Tanh)
    }

    /// Number of weights of a layer with `n` inputs and `m` outputs.
    pub fn weight_count(&self, n: usize, m: usize) -> usize {
        match self {
            LayerKind::Dense => n * m,
            LayerKind::Conv(c) => c.weight_count(),
            LayerKind::MaxPool(_) | LayerKind::Sigmoid | LayerKind::Tanh => 0,
        }
    }

    /// `(input index, weight index)` of every term of output `o`'s sum (for a max pooling,
    /// the window of `o`; for a table activation, input `o`).
    pub fn connections(&self, n: usize, o: usize) -> Vec<(usize, usize)> {
        match self {
            LayerKind::Dense => (0..n).map(|i| (i, o * n + i)).collect(),
            LayerKind::Sigmoid | LayerKind::Tanh => vec![(o, 0)],
            LayerKind::Conv(c) | LayerKind::MaxPool(c) => {
                let (oh, ow) = (c.out_h() as usize, c.out_w() as usize);
                let (h, w) = (c.in_h as usize, c.in_w as usize);
                let (kh, kw) = (c.kernel[0] as usize, c.kernel[1] as usize);
                let ch = o / (oh * ow);
                let (oy, ox) = ((o % (oh * ow)) / ow, o % ow);
                let channels = if c.depthwise {
                    ch..ch + 1
                } else {
                    0..c.in_channels as usize
                };
                let mut out = Vec::new();
                for ci in channels {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy =
                                (oy * c.stride[0] as usize + ky).checked_sub(c.pads[0] as usize);
                            let ix =
                                (ox * c.stride[1] as usize + kx).checked_sub(c.pads[1] as usize);
                            let (Some(iy), Some(ix)) = (iy, ix) else {
                                continue;
                            };
                            if iy >= h || ix >= w {
                                continue;
                            }
                            let widx = if c.depthwise {
                                (ch * kh + ky) * kw + kx
                            } else {
                                ((ch * c.in_channels as usize + ci) * kh + ky) * kw + kx
                            };
                            out.push((ci * h * w + iy * w + ix, widx));
                        }
                    }
                }
                out
            }
        }
    }

    /// Groups of at most `lanes` outputs that share one block: consecutive outputs for dense
    /// layers (and, unused, for the layers without weights); for convolutions, the channels at
    /// one output position (same input patch).
    pub fn groups(&self, m: usize, lanes: usize) -> Vec<Vec<usize>> {
        let lanes = lanes.max(1);
        match self {
            LayerKind::Dense | LayerKind::MaxPool(_) | LayerKind::Sigmoid | LayerKind::Tanh => (0
                ..m)
                .collect::<Vec<_>>()
                .chunks(lanes)
                .map(<[usize]>::to_vec)
                .collect(),
            LayerKind::Conv(c) => {
                let p = c.out_h() as usize * c.out_w() as usize;
                let chans: Vec<usize> = (0..c.out_channels as usize).collect();
                (0..p)
                    .flat_map(|pos| {
                        chans
                            .chunks(lanes)
                            .map(move |g| g.iter().map(|ch| ch * p + pos).collect())
                            .collect::<Vec<Vec<usize>>>()
                    })
                    .collect()
            }
        }
    }
}

/// One block: up to `lanes` outputs over a list of inputs (one row each), with the weight
/// index of every (row, lane) that is connected.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub row: usize,
    pub outputs: Vec<usize>,
    pub inputs: Vec<usize>,
    /// `[row][lane]`
    pub weights: Vec<Vec<Option<usize>>>,
}

/// Plans the blocks of a layer of `lanes` lanes starting at `row`; returns the blocks and the
/// next free row.
pub(crate) fn plan(
    kind: &LayerKind,
    n: usize,
    m: usize,
    mut row: usize,
    lanes: usize,
) -> (Vec<Block>, usize) {
    let mut blocks = Vec::new();
    for outputs in kind.groups(m, lanes) {
        let conns: Vec<Vec<(usize, usize)>> =
            outputs.iter().map(|&o| kind.connections(n, o)).collect();
        let mut inputs: Vec<usize> = conns.iter().flatten().map(|c| c.0).collect();
        inputs.sort_unstable();
        inputs.dedup();
        let weights = if kind.is_dense() {
            inputs
                .iter()
                .map(|&i| outputs.iter().map(|&o| Some(o * n + i)).collect())
                .collect()
        } else {
            let maps: Vec<std::collections::HashMap<usize, usize>> =
                conns.iter().map(|c| c.iter().copied().collect()).collect();
            inputs
                .iter()
                .map(|i| maps.iter().map(|m| m.get(i).copied()).collect())
                .collect()
        };
        let len = inputs.len();
        blocks.push(Block {
            row,
            outputs,
            inputs,
            weights,
        });
        row += len + 1;
    }
    (blocks, row + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_connections_and_groups() {
        let c = ConvShape {
            in_channels: 2,
            in_h: 4,
            in_w: 4,
            out_channels: 3,
            kernel: [3, 3],
            stride: [1, 1],
            pads: [1, 1, 1, 1],
            depthwise: false,
        };
        assert_eq!((c.out_h(), c.out_w()), (4, 4));
        let k = LayerKind::Conv(c);
        // Corner output: only the 2x2 in-bounds part of the kernel, per input channel.
        assert_eq!(k.connections(32, 0).len(), 8);
        assert_eq!(k.connections(32, 5).len(), 18);
        let groups = k.groups(48, 8);
        assert_eq!(groups.len(), 16);
        assert_eq!(groups[1], vec![1, 17, 33]);
        let (blocks, end) = plan(&k, 32, 48, 10, 8);
        assert!(!k.is_dense() && k.is_linear() && !k.is_table());
        assert_eq!(blocks[0].row, 10);
        assert_eq!(blocks[0].inputs.len(), 8);
        assert_eq!(
            end,
            10 + blocks.iter().map(|b| b.inputs.len() + 1).sum::<usize>() + 1
        );
    }

    #[test]
    fn max_pool_windows_skip_padding() {
        let c = ConvShape {
            in_channels: 2,
            in_h: 3,
            in_w: 3,
            out_channels: 2,
            kernel: [2, 2],
            stride: [2, 2],
            pads: [1, 1, 0, 0],
            depthwise: true,
        };
        assert!(c.pads_within_kernel() && c.is_valid());
        assert_eq!((c.out_h(), c.out_w()), (2, 2));
        let k = LayerKind::MaxPool(c.clone());
        assert!(!k.is_linear() && k.weight_count(18, 8) == 0);
        // Top-left window: only input (0, 0) is in bounds.
        let w: Vec<usize> = k.connections(18, 0).iter().map(|c| c.0).collect();
        assert_eq!(w, vec![0]);
        // Second channel, bottom-right window: rows 1..3, columns 1..3.
        let w: Vec<usize> = k.connections(18, 7).iter().map(|c| c.0).collect();
        assert_eq!(w, vec![13, 14, 16, 17]);
        let mut bad = c;
        bad.kernel = [1, 3];
        bad.pads = [1, 0, 0, 0];
        assert!(!bad.pads_within_kernel());
        assert_eq!(LayerKind::Tanh.connections(5, 3), vec![(3, 0)]);
    }
}
