//! Mutations of seeds, as a coverage-blind fuzzer makes them: bit flips, interesting
//! numbers, dictionary tokens, deleted, repeated and spliced ranges.

/// A small, fast generator (xorshift64*), seeded so a failing run can be replayed.
pub struct Rng(u64);

/// Values at the edges of integer types, little-endian, for length and count fields.
const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
    1 << 40,
];

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// A mutation of one of `seeds` (one to four changes).
    pub fn mutate(&mut self, seeds: &[Vec<u8>], dictionary: &[&[u8]]) -> Vec<u8> {
        let mut out = seeds[self.below(seeds.len())].clone();
        for _ in 0..=self.below(4) {
            let at = self.below(out.len() + 1);
            match self.below(8) {
                0 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] ^= 1 << self.below(8);
                }
                1 if !out.is_empty() => {
                    let i = self.below(out.len());
                    out[i] = self.next_u64() as u8;
                }
                2 => {
                    let value = INTERESTING[self.below(INTERESTING.len())].to_le_bytes();
                    let width = [1, 2, 4, 8][self.below(4)];
                    let end = (at + width).min(out.len());
                    out.splice(at..end, value[..width].iter().copied());
                }
                3 if !dictionary.is_empty() => {
                    let token = dictionary[self.below(dictionary.len())];
                    out.splice(at..at, token.iter().copied());
                }
                4 => {
                    let end = (at + self.below(16) + 1).min(out.len());
                    out.drain(at..end);
                }
                5 => {
                    let end = (at + self.below(64) + 1).min(out.len());
                    let copy = out[at..end].to_vec();
                    let times = self.below(8) + 1;
                    for _ in 0..times {
                        out.splice(at..at, copy.iter().copied());
                    }
                }
                6 => {
                    let other = &seeds[self.below(seeds.len())];
                    let from = self.below(other.len() + 1);
                    let to = from + self.below(other.len() - from + 1);
                    out.splice(at.., other[from..to].iter().copied());
                }
                _ => out.truncate(at),
            }
        }
        out
    }
}
