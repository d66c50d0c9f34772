//! The key/value cache of every sequence in the loop, for a graph that appends to it in place
//! (`kv_in_place`) on a backend that runs so: one buffer per layer and kind, rows of
//! `[kv_heads, capacity, head_dim]`, one row per sequence. A pass runs over a range of rows,
//! so [`KvArena::place`] first brings its batch together, moving only the filled positions of
//! the rows that are out of place. Nothing is copied per step otherwise, and nothing is
//! allocated but when the longest sequence outgrows the capacity (which then doubles).

use std::ops::Range;

/// Sequences are known to the arena by an id the loop gives them.
pub(super) type SeqId = u64;

pub(super) struct KvArena {
    /// Per layer and kind (index 2·layer + kind): rows × kv_heads × capacity × head_dim.
    buffers: Vec<Vec<f32>>,
    kv_heads: usize,
    head_dim: usize,
    /// Positions a row holds.
    capacity: usize,
    /// The most positions a row ever needs (the context length).
    max_capacity: usize,
    /// Who holds each row; the last row is a spare for swaps.
    owner: Vec<Option<SeqId>>,
    /// Positions filled in each row.
    filled: Vec<usize>,
}

impl KvArena {
    /// An arena of `rows` rows (the most sequences in the loop at once), empty until
    /// [`ensure`](Self::ensure) sizes it.
    pub(super) fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        rows: usize,
        max_capacity: usize,
    ) -> Self {
        Self {
            buffers: vec![Vec::new(); 2 * layers],
            kv_heads,
            head_dim,
            capacity: 0,
            max_capacity,
            owner: vec![None; rows + 1],
            filled: vec![0; rows + 1],
        }
    }

    fn row_len(&self) -> usize {
        self.kv_heads * self.capacity * self.head_dim
    }

    /// The row of `id`.
    pub(super) fn row_of(&self, id: SeqId) -> usize {
        self.owner
            .iter()
            .position(|o| *o == Some(id))
            .expect("a sequence in the loop holds a row")
    }

    /// Gives `id` a free row.
    pub(super) fn admit(&mut self, id: SeqId) {
        let spare = self.owner.len() - 1;
        let row = self.owner[..spare]
            .iter()
            .position(Option::is_none)
            .expect("no more sequences than rows");
        self.owner[row] = Some(id);
        self.filled[row] = 0;
    }

    /// Frees the rows of every sequence not in `live`.
    pub(super) fn keep_only(&mut self, live: impl Fn(SeqId) -> bool) {
        for (owner, filled) in self.owner.iter_mut().zip(&mut self.filled) {
            if owner.is_some_and(|id| !live(id)) {
                *owner = None;
                *filled = 0;
            }
        }
    }

    /// Makes every row hold at least `positions` positions (up to the context length).
    pub(super) fn ensure(&mut self, positions: usize) {
        if positions <= self.capacity {
            return;
        }
        let capacity = positions
            .next_power_of_two()
            .max(64)
            .min(self.max_capacity.max(positions));
        let (old_capacity, rows) = (self.capacity, self.owner.len());
        let hd = self.head_dim;
        for buffer in &mut self.buffers {
            let mut grown = vec![0f32; rows * self.kv_heads * capacity * hd];
            for row in 0..rows {
                let used = self.filled[row] * hd;
                for head in 0..self.kv_heads {
                    let from = (row * self.kv_heads + head) * old_capacity * hd;
                    let to = (row * self.kv_heads + head) * capacity * hd;
                    grown[to..to + used].copy_from_slice(&buffer[from..from + used]);
                }
            }
            *buffer = grown;
        }
        self.capacity = capacity;
    }

    /// Moves rows so that `ids` hold rows `base..base + ids.len()` (in some order: sort the
    /// batch by [`row_of`](Self::row_of) after).
    pub(super) fn place(&mut self, ids: &[SeqId], base: usize) {
        let targets = base..base + ids.len();
        let mut free: Vec<usize> = targets
            .clone()
            .filter(|&row| !self.owner[row].is_some_and(|o| ids.contains(&o)))
            .collect();
        for &id in ids {
            let row = self.row_of(id);
            if !targets.contains(&row) {
                let target = free.pop().expect("as many free targets as misplaced rows");
                self.swap(row, target);
            }
        }
    }

    /// Swaps two rows through the spare one.
    fn swap(&mut self, a: usize, b: usize) {
        let spare = self.owner.len() - 1;
        self.copy_row(a, spare);
        self.copy_row(b, a);
        self.copy_row(spare, b);
        self.owner.swap(a, b);
    }

    /// Copies the filled positions of row `from` into row `to` (filled counts follow).
    fn copy_row(&mut self, from: usize, to: usize) {
        let (kv, hd, cap) = (self.kv_heads, self.head_dim, self.capacity);
        let used = self.filled[from] * hd;
        for buffer in &mut self.buffers {
            for head in 0..kv {
                let src = (from * kv + head) * cap * hd;
                let dst = (to * kv + head) * cap * hd;
                buffer.copy_within(src..src + used, dst);
            }
        }
        self.filled[to] = self.filled[from];
    }

    /// Records `count` positions the graph appended to `id`'s row.
    pub(super) fn appended(&mut self, id: SeqId, count: usize) {
        let row = self.row_of(id);
        self.filled[row] += count;
    }

    /// The buffers of `rows`, `[rows, kv_heads, capacity, head_dim]` each, for a pass.
    pub(super) fn views(&mut self, rows: Range<usize>) -> (Vec<&mut [f32]>, [usize; 4]) {
        let len = self.row_len();
        let shape = [rows.len(), self.kv_heads, self.capacity, self.head_dim];
        let views = self
            .buffers
            .iter_mut()
            .map(|b| &mut b[rows.start * len..rows.end * len])
            .collect();
        (views, shape)
    }

    /// The first `positions` of `id`'s row, per cache slot and head (for the prefix cache).
    pub(super) fn read(&self, id: SeqId, positions: usize) -> Vec<Vec<Vec<f32>>> {
        let row = self.row_of(id);
        let (kv, hd, cap) = (self.kv_heads, self.head_dim, self.capacity);
        self.buffers
            .iter()
            .map(|buffer| {
                (0..kv)
                    .map(|head| {
                        let start = (row * kv + head) * cap * hd;
                        buffer[start..start + positions * hd].to_vec()
                    })
                    .collect()
            })
            .collect()
    }

    /// Fills the empty row of `id` with `positions` positions of `cache` (per slot and head).
    pub(super) fn write(&mut self, id: SeqId, cache: &[Vec<Vec<f32>>], positions: usize) {
        self.ensure(positions);
        let row = self.row_of(id);
        let (kv, hd, cap) = (self.kv_heads, self.head_dim, self.capacity);
        for (buffer, slot) in self.buffers.iter_mut().zip(cache) {
            for (head, values) in slot.iter().enumerate().take(kv) {
                let start = (row * kv + head) * cap * hd;
                buffer[start..start + positions * hd].copy_from_slice(&values[..positions * hd]);
            }
        }
        self.filled[row] = positions;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arena of one layer, one head, head_dim 1: a row's positions are its values.
    fn arena() -> KvArena {
        KvArena::new(1, 1, 1, 4, 1024)
    }

    fn row_values(arena: &KvArena, id: SeqId) -> Vec<f32> {
        arena.read(id, arena.filled[arena.row_of(id)])[0][0].clone()
    }

    #[test]
    fn rows_keep_their_positions_through_growth_and_placement() {
        let mut a = arena();
        for id in 1..=4 {
            a.admit(id);
            let values = vec![id as f32; id as usize];
            a.write(id, &[vec![values.clone()], vec![values]], id as usize);
        }
        // Rows 0..4 hold ids 1..4; bring 4 and 2 to rows 0..2.
        a.place(&[4, 2], 0);
        let rows = [a.row_of(4), a.row_of(2)];
        assert!(rows.iter().all(|r| (0..2).contains(r)), "{rows:?}");
        for id in 1..=4 {
            assert_eq!(row_values(&a, id), vec![id as f32; id as usize], "id {id}");
        }
        // Growth keeps what each row holds.
        a.ensure(300);
        assert!(a.capacity >= 300);
        for id in 1..=4 {
            assert_eq!(row_values(&a, id), vec![id as f32; id as usize], "id {id}");
        }
        // A freed row is taken by the next sequence, which starts empty.
        a.keep_only(|id| id != 3);
        a.admit(9);
        assert_eq!(a.filled[a.row_of(9)], 0);
        let capacity = a.capacity;
        let (views, shape) = a.views(1..3);
        assert_eq!(shape, [2, 1, capacity, 1]);
        assert_eq!(views[0].len(), 2 * capacity);
    }
}
