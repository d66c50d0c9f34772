//! LoRA slots of a generation loop whose graph has them (`kiln_formats::add_lora_slots`):
//! which adapters are resident, the concatenated slot matrices the session keeps as resident
//! inputs, and each pass's per-row mask. An adapter becomes resident between steps, in a free
//! slot or in place of the least recently used one no running sequence needs; its columns
//! are rebuilt then, never during a pass. A loop may pin one adapter: rows that name none go
//! through it (a live-merged addon on a 4-bit graph, whose blocks are not merged).

use std::sync::Arc;

use kiln_formats::{LORA_MASK, LoraWeights};

use crate::backend::TensorInfo;
use crate::tensor::{Tensor, TensorData};

/// A LoRA addon's weights, as requests for it carry them.
#[derive(Debug)]
pub struct Adapter {
    /// What identifies its weights (the content digest of its files): the prefix cache keys
    /// entries by it, since keys and values depend on the adapter.
    pub key: String,
    /// The addon model (`accounts/{a}/models/{m}`), for messages.
    pub name: String,
    pub weights: Arc<LoraWeights>,
}

/// An adapted linear layer of the graph: its slot inputs and features.
#[derive(Debug, Clone, PartialEq)]
struct SlotInput {
    layer: usize,
    module: String,
    a: String,
    b: String,
    inputs: usize,
    outputs: usize,
}

struct Resident {
    adapter: Arc<Adapter>,
    used: u64,
}

/// Where an adapter stands after [`LoraSlots::make_resident`].
#[derive(Debug, PartialEq)]
pub(super) enum Residency {
    /// In a slot already.
    Resident,
    /// Put in a slot: the resident inputs must be set again.
    Loaded,
    /// Every slot holds an adapter a sequence in the loop uses: wait.
    Busy,
}

pub(super) struct LoraSlots {
    linears: Vec<SlotInput>,
    slots: Vec<Option<Resident>>,
    /// In slot 0 for good: what rows without an adapter of their own go through.
    pinned: Option<Arc<Adapter>>,
    clock: u64,
}

impl LoraSlots {
    /// The slots of a graph with LoRA slot inputs (None without them): `count` of them, and
    /// one more for `pinned`.
    pub(super) fn of_graph(
        inputs: &[TensorInfo],
        count: usize,
        pinned: Option<Arc<Adapter>>,
    ) -> Option<Self> {
        if !inputs.iter().any(|t| t.name == LORA_MASK) {
            return None;
        }
        let dim = |name: &str, axis: usize| {
            inputs
                .iter()
                .find(|t| t.name == name)
                .and_then(|t| t.shape.get(axis).copied())
                .and_then(|d| usize::try_from(d).ok())
        };
        let mut linears = Vec::new();
        for info in inputs {
            let Some(rest) = info.name.strip_prefix("lora.") else {
                continue;
            };
            let Some(slot) = rest.strip_suffix(".a") else {
                continue;
            };
            let (layer, module) = slot.split_once('.')?;
            let b = format!("lora.{slot}.b");
            linears.push(SlotInput {
                layer: layer.parse().ok()?,
                module: module.to_owned(),
                inputs: dim(&info.name, 0)?,
                outputs: dim(&b, 1)?,
                a: info.name.clone(),
                b,
            });
        }
        let mut slots: Vec<Option<Resident>> = (0..count.max(1)).map(|_| None).collect();
        if let Some(adapter) = &pinned {
            slots.insert(
                0,
                Some(Resident {
                    adapter: adapter.clone(),
                    used: 0,
                }),
            );
        }
        Some(Self {
            linears,
            slots,
            pinned,
            clock: 0,
        })
    }

    /// Whether `adapter`'s linears are all slotted linears of the graph, with their features.
    fn fits(&self, adapter: &Adapter) -> Result<(), String> {
        for (&(layer, module), linear) in &adapter.weights.linears {
            let slotted = self
                .linears
                .iter()
                .find(|l| l.layer == layer && l.module == module);
            match slotted {
                Some(l) if (l.inputs, l.outputs) == (linear.inputs, linear.outputs) => {}
                Some(l) => {
                    return Err(format!(
                        "{} adapts layer {layer}'s {module} as {} in × {} out, but the model's \
                         is {} × {}",
                        adapter.name, linear.inputs, linear.outputs, l.inputs, l.outputs
                    ));
                }
                None => {
                    return Err(format!(
                        "{} adapts layer {layer}'s {module}, which the model's graph has no \
                         LoRA slot for",
                        adapter.name
                    ));
                }
            }
        }
        Ok(())
    }

    fn slot_of(&self, key: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|r| r.adapter.key == key))
    }

    /// Makes `adapter` resident, in a free slot or in place of the least recently used
    /// adapter that no key of `busy` names; an adapter that does not [`fit`](Self::fits)
    /// the graph is refused before it takes a slot.
    pub(super) fn make_resident<'a>(
        &mut self,
        adapter: &Arc<Adapter>,
        busy: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<Residency, String> {
        self.clock += 1;
        if let Some(slot) = self.slot_of(&adapter.key) {
            self.slots[slot].as_mut().expect("occupied").used = self.clock;
            return Ok(Residency::Resident);
        }
        self.fits(adapter)?;
        let free = self.slots.iter().position(Option::is_none).or_else(|| {
            self.slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.as_ref().map(|r| (i, r)))
                .filter(|(i, _)| *i > 0 || self.pinned.is_none())
                .filter(|(_, r)| !busy.clone().any(|k| k == r.adapter.key))
                .min_by_key(|(_, r)| r.used)
                .map(|(i, _)| i)
        });
        let Some(slot) = free else {
            return Ok(Residency::Busy);
        };
        if let Some(evicted) = &self.slots[slot] {
            tracing::info!(adapter = %evicted.adapter.name, "LoRA adapter evicted from its slot");
        }
        self.slots[slot] = Some(Resident {
            adapter: adapter.clone(),
            used: self.clock,
        });
        Ok(Residency::Loaded)
    }

    /// Empties the slot of the adapter `key` names.
    pub(super) fn remove(&mut self, key: &str) {
        if let Some(slot) = self.slot_of(key) {
            self.slots[slot] = None;
        }
    }

    /// Slots that hold an adapter.
    pub(super) fn occupied(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// The resident adapters' names, slot by slot.
    #[cfg(test)]
    pub(super) fn resident(&self) -> Vec<Option<&str>> {
        self.slots
            .iter()
            .map(|s| s.as_ref().map(|r| r.adapter.name.as_str()))
            .collect()
    }

    /// The first column and rank of each occupied slot in the concatenated matrices.
    fn columns(&self) -> (Vec<Option<(usize, usize)>>, usize) {
        let mut next = 0;
        let spans = self
            .slots
            .iter()
            .map(|s| {
                s.as_ref().map(|r| {
                    let span = (next, r.adapter.weights.rank);
                    next += r.adapter.weights.rank;
                    span
                })
            })
            .collect();
        (spans, next)
    }

    /// Every slotted linear's `A [in, R]` and `B [R, out]`: the resident adapters' matrices
    /// side by side (zeros where an adapter leaves a linear alone).
    pub(super) fn resident_inputs(&self) -> Vec<(String, Tensor)> {
        let (spans, width) = self.columns();
        let mut inputs = Vec::with_capacity(2 * self.linears.len());
        for l in &self.linears {
            let mut a = vec![0f32; l.inputs * width];
            let mut b = vec![0f32; width * l.outputs];
            for (slot, span) in self.slots.iter().zip(&spans) {
                let (Some(resident), Some((first, rank))) = (slot, span) else {
                    continue;
                };
                let Some(w) = resident.adapter.weights.linears.get(&(l.layer, &*l.module)) else {
                    continue;
                };
                // lora_A [r][in] into columns of A [in][R]; lora_B [out][r] into rows of B.
                for k in 0..*rank {
                    for i in 0..l.inputs {
                        a[i * width + first + k] = w.a[k * l.inputs + i];
                    }
                    for o in 0..l.outputs {
                        b[(first + k) * l.outputs + o] = w.b[o * rank + k];
                    }
                }
            }
            inputs.push((
                l.a.clone(),
                Tensor {
                    shape: vec![l.inputs, width],
                    data: TensorData::F32(a),
                },
            ));
            inputs.push((
                l.b.clone(),
                Tensor {
                    shape: vec![width, l.outputs],
                    data: TensorData::F32(b),
                },
            ));
        }
        inputs
    }

    /// The mask of a pass whose rows use these adapters (None: the bare base): ones over the
    /// columns of each row's adapter. A row's adapter that is not resident is an error, never
    /// a row served by the bare base.
    pub(super) fn mask<'a>(
        &self,
        rows: impl ExactSizeIterator<Item = Option<&'a Adapter>>,
    ) -> Result<Tensor, String> {
        let (spans, width) = self.columns();
        let batch = rows.len();
        let mut mask = vec![0f32; batch * width];
        for (row, adapter) in rows.enumerate() {
            let Some(adapter) = adapter.or(self.pinned.as_deref()) else {
                continue;
            };
            let (first, rank) = self
                .slot_of(&adapter.key)
                .and_then(|s| spans[s])
                .ok_or_else(|| format!("LoRA adapter {} is not in a slot", adapter.name))?;
            mask[row * width + first..row * width + first + rank].fill(1.0);
        }
        Ok(Tensor {
            shape: vec![batch, 1, width],
            data: TensorData::F32(mask),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kiln_formats::LoraLinear;

    use super::*;
    use crate::tensor::DataType;

    /// A graph with slots on layer 0's q_proj (4 in, 4 out) and v_proj (4 in, 2 out).
    fn graph_inputs() -> Vec<TensorInfo> {
        let info = |name: &str, shape: Vec<i64>| TensorInfo {
            name: name.into(),
            dtype: DataType::F32,
            shape,
        };
        vec![
            info("input_ids", vec![-1, -1]),
            info(LORA_MASK, vec![-1, 1, -1]),
            info("lora.0.q_proj.a", vec![4, -1]),
            info("lora.0.q_proj.b", vec![-1, 4]),
            info("lora.0.v_proj.a", vec![4, -1]),
            info("lora.0.v_proj.b", vec![-1, 2]),
        ]
    }

    /// An adapter of rank `rank` on q_proj whose A and B entries are `value`.
    fn adapter(name: &str, rank: usize, value: f32) -> Arc<Adapter> {
        let mut linears = BTreeMap::new();
        linears.insert(
            (0, "q_proj"),
            LoraLinear {
                inputs: 4,
                outputs: 4,
                a: vec![value; rank * 4],
                b: vec![value; 4 * rank],
            },
        );
        Arc::new(Adapter {
            key: format!("{name}-digest"),
            name: name.into(),
            weights: Arc::new(LoraWeights { rank, linears }),
        })
    }

    fn f32s(t: &Tensor) -> &[f32] {
        match &t.data {
            TensorData::F32(v) => v,
            _ => panic!("f32"),
        }
    }

    #[test]
    fn a_graph_without_slots_has_none() {
        assert!(LoraSlots::of_graph(&graph_inputs()[..1], 4, None).is_none());
        let slots = LoraSlots::of_graph(&graph_inputs(), 4, None).unwrap();
        assert_eq!(slots.linears.len(), 2);
        assert_eq!((slots.linears[1].inputs, slots.linears[1].outputs), (4, 2));
        // Nothing resident: zero-width matrices.
        let inputs = slots.resident_inputs();
        assert_eq!(inputs[0].1.shape, [4, 0]);
        assert_eq!(inputs[3].1.shape, [0, 2]);
    }

    #[test]
    fn the_least_recently_used_idle_adapter_gives_up_its_slot() {
        let mut slots = LoraSlots::of_graph(&graph_inputs(), 2, None).unwrap();
        let (a, b, c) = (
            adapter("a", 2, 1.0),
            adapter("b", 2, 1.0),
            adapter("c", 2, 1.0),
        );
        let idle = std::iter::empty::<&str>();
        assert_eq!(
            slots.make_resident(&a, idle.clone()).unwrap(),
            Residency::Loaded
        );
        assert_eq!(
            slots.make_resident(&b, idle.clone()).unwrap(),
            Residency::Loaded
        );
        assert_eq!(
            slots.make_resident(&a, idle.clone()).unwrap(),
            Residency::Resident
        );
        // b is the least recently used: c takes its slot.
        assert_eq!(
            slots.make_resident(&c, idle.clone()).unwrap(),
            Residency::Loaded
        );
        assert_eq!(slots.resident(), [Some("a"), Some("c")]);
        // Both in use by running sequences: b waits.
        let busy = ["a-digest", "c-digest"];
        assert_eq!(
            slots.make_resident(&b, busy.iter().copied()).unwrap(),
            Residency::Busy
        );
        // Only c in use: a (older, idle) goes even though c is older still.
        assert_eq!(
            slots
                .make_resident(&b, ["c-digest"].iter().copied())
                .unwrap(),
            Residency::Loaded
        );
        assert_eq!(slots.resident(), [Some("b"), Some("c")]);
    }

    #[test]
    fn slots_sit_side_by_side_and_rows_select_their_own() {
        let mut slots = LoraSlots::of_graph(&graph_inputs(), 4, None).unwrap();
        let (a, b) = (adapter("a", 2, 1.0), adapter("b", 3, 2.0));
        let idle = std::iter::empty::<&str>();
        slots.make_resident(&a, idle.clone()).unwrap();
        slots.make_resident(&b, idle).unwrap();
        let inputs = slots.resident_inputs();
        // q_proj's A: [4 in, 2 + 3 columns], a's then b's; B: [5, 4 out].
        let (q_a, q_b) = (&inputs[0].1, &inputs[1].1);
        assert_eq!(
            (q_a.shape.clone(), q_b.shape.clone()),
            (vec![4, 5], vec![5, 4])
        );
        assert_eq!(&f32s(q_a)[..5], [1.0, 1.0, 2.0, 2.0, 2.0]);
        assert_eq!(&f32s(q_b)[..4], [1.0; 4]);
        assert_eq!(&f32s(q_b)[16..], [2.0; 4]);
        // Neither adapts v_proj: zeros of the same width.
        assert_eq!(inputs[2].1.shape, [4, 5]);
        assert!(f32s(&inputs[2].1).iter().all(|&v| v == 0.0));

        let mask = slots
            .mask([Some(&*b), None, Some(&*a)].into_iter())
            .unwrap();
        assert_eq!(mask.shape, [3, 1, 5]);
        assert_eq!(
            f32s(&mask),
            [
                0.0, 0.0, 1.0, 1.0, 1.0, // b
                0.0, 0.0, 0.0, 0.0, 0.0, // the base
                1.0, 1.0, 0.0, 0.0, 0.0, // a
            ]
        );
        // A row whose adapter is not resident is an error, not a row of the bare base.
        let c = adapter("c", 2, 1.0);
        let err = slots.mask([Some(&*c)].into_iter()).unwrap_err();
        assert_eq!(err, "LoRA adapter c is not in a slot");
    }

    #[test]
    fn an_adapter_must_fit_the_slotted_linears() {
        let slots = LoraSlots::of_graph(&graph_inputs(), 4, None).unwrap();
        slots.fits(&adapter("a", 2, 1.0)).unwrap();
        let mut weights = (*adapter("wide", 2, 1.0).weights).clone();
        weights.linears.get_mut(&(0, "q_proj")).unwrap().outputs = 8;
        weights
            .linears
            .insert((3, "down_proj"), weights.linears[&(0, "q_proj")].clone());
        let wide = Adapter {
            key: "k".into(),
            name: "wide".into(),
            weights: Arc::new(weights),
        };
        let err = slots.fits(&wide).unwrap_err();
        assert!(
            err.contains("as 4 in × 8 out, but the model's is 4 × 4"),
            "{err}"
        );
    }

    #[test]
    fn a_pinned_adapter_serves_rows_without_one_and_keeps_its_slot() {
        let pinned = adapter("merged", 2, 1.0);
        let mut slots = LoraSlots::of_graph(&graph_inputs(), 1, Some(pinned.clone())).unwrap();
        assert_eq!(slots.resident(), [Some("merged"), None]);
        let (a, b) = (adapter("a", 1, 1.0), adapter("b", 1, 1.0));
        let idle = std::iter::empty::<&str>();
        assert_eq!(
            slots.make_resident(&a, idle.clone()).unwrap(),
            Residency::Loaded
        );
        // b takes a's slot, never the pinned one.
        assert_eq!(slots.make_resident(&b, idle).unwrap(), Residency::Loaded);
        assert_eq!(slots.resident(), [Some("merged"), Some("b")]);
        let mask = slots.mask([None, Some(&*b)].into_iter()).unwrap();
        assert_eq!(f32s(&mask), [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    }
}
