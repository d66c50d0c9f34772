//! The prefix cache: key/value entries of recent token sequences, shared in whole blocks.

/// Tokens shared through the prefix cache come in whole blocks of this many.
const PREFIX_BLOCK: usize = 16;

/// Key/value entries of recent token sequences (prompts, and prompts with their answers),
/// so a prompt that begins like one of them (a shared system prompt, the earlier turns of a
/// chat, the other choices of a request) starts from its entries rather than computing them
/// again. Bounded in tokens; the least recently used entries go first.
pub(super) struct PrefixCache {
    entries: Vec<PrefixEntry>,
    held: usize,
    pub(super) capacity: usize,
    clock: u64,
}

struct PrefixEntry {
    /// The LoRA adapter the entries were computed through ("": the bare base).
    adapter: String,
    tokens: Vec<u32>,
    /// Per cache slot and head: `tokens.len()` positions × head_dim.
    cache: Vec<Vec<Vec<f32>>>,
    used: u64,
}

impl PrefixCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            held: 0,
            capacity,
            clock: 0,
        }
    }

    /// Copies the longest cached beginning of `prompt` (whole blocks, leaving at least its
    /// last token to compute) into the empty `cache`; returns its length in tokens.
    pub(super) fn take(
        &mut self,
        adapter: &str,
        prompt: &[u32],
        cache: &mut [Vec<Vec<f32>>],
        head_dim: usize,
    ) -> usize {
        let Some((best, len)) = self.best(adapter, prompt) else {
            return 0;
        };
        self.clock += 1;
        let entry = &mut self.entries[best];
        entry.used = self.clock;
        for (slot, from) in cache.iter_mut().zip(&entry.cache) {
            for (head, cached) in slot.iter_mut().zip(from) {
                head.extend_from_slice(&cached[..len * head_dim]);
            }
        }
        len
    }

    /// How many tokens of `prompt` [`take`](Self::take) would give, without taking them.
    pub(super) fn peek(&self, adapter: &str, prompt: &[u32]) -> usize {
        self.best(adapter, prompt).map_or(0, |(_, len)| len)
    }

    /// The entry of `adapter` covering the most of `prompt`, and how many tokens of it.
    fn best(&self, adapter: &str, prompt: &[u32]) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.adapter == adapter)
            .map(|(i, e)| (i, shared_blocks(&e.tokens, prompt)))
            .max_by_key(|&(_, len)| len)
            .filter(|&(_, len)| len > 0)
    }

    /// Whether nothing of `tokens` needs keeping: no whole block, more than the budget, or an
    /// entry of `adapter` already holds its whole blocks (that entry counts as used). Asked
    /// before the keys and values are gathered for [`insert`](Self::insert).
    pub(super) fn covers(&mut self, adapter: &str, tokens: &[u32]) -> bool {
        let len = tokens.len() / PREFIX_BLOCK * PREFIX_BLOCK;
        if len == 0 || len > self.capacity {
            return true;
        }
        let tokens = &tokens[..len];
        self.clock += 1;
        match self
            .entries
            .iter_mut()
            .find(|e| e.adapter == adapter && e.tokens.starts_with(tokens))
        {
            Some(covering) => {
                covering.used = self.clock;
                true
            }
            None => false,
        }
    }

    /// Keeps the whole blocks of `tokens` with their entries from `cache` (which holds at
    /// least that many positions), unless an entry already covers them.
    pub(super) fn insert(
        &mut self,
        adapter: &str,
        tokens: &[u32],
        cache: &[Vec<Vec<f32>>],
        head_dim: usize,
    ) {
        let len = tokens.len() / PREFIX_BLOCK * PREFIX_BLOCK;
        let positions = cache
            .first()
            .and_then(|s| s.first())
            .map_or(0, |h| h.len() / head_dim.max(1));
        if len == 0 || len > self.capacity || len > positions {
            return;
        }
        if self.covers(adapter, tokens) {
            return;
        }
        let tokens = &tokens[..len];
        // Entries this one extends are covered by it from now on.
        let before = self.entries.len();
        self.entries
            .retain(|e| e.adapter != adapter || !tokens.starts_with(&e.tokens));
        if self.entries.len() != before {
            self.held = self.entries.iter().map(|e| e.tokens.len()).sum();
        }
        while self.held + len > self.capacity {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
                .expect("entries hold what is counted");
            self.held -= self.entries.swap_remove(oldest).tokens.len();
        }
        let cache = cache
            .iter()
            .map(|slot| slot.iter().map(|h| h[..len * head_dim].to_vec()).collect())
            .collect();
        self.entries.push(PrefixEntry {
            adapter: adapter.to_owned(),
            tokens: tokens.to_vec(),
            cache,
            used: self.clock,
        });
        self.held += len;
    }
}

/// Tokens at the start of `b` that `a` begins with too, in whole prefix-cache blocks (as
/// the cache would give them to `b`, leaving its last token to compute).
pub(super) fn shared_blocks(a: &[u32], b: &[u32]) -> usize {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    common.min(b.len().saturating_sub(1)) / PREFIX_BLOCK * PREFIX_BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of one slot and one head with head_dim 1, position p holding `tokens[p]`.
    fn kv(tokens: &[u32]) -> Vec<Vec<Vec<f32>>> {
        vec![vec![tokens.iter().map(|&t| t as f32).collect()]]
    }

    fn empty() -> Vec<Vec<Vec<f32>>> {
        vec![vec![Vec::new()]]
    }

    #[test]
    fn a_prompt_takes_the_whole_blocks_it_shares_with_an_entry() {
        let mut cache = PrefixCache::new(1024);
        let first: Vec<u32> = (0..40).collect();
        cache.insert("", &first, &kv(&first), 1);
        assert_eq!(cache.held, 32, "whole blocks only");
        // Shares 35 tokens: 2 blocks.
        let mut second: Vec<u32> = (0..35).collect();
        second.extend([900, 901, 902]);
        let mut into = empty();
        assert_eq!(cache.take("", &second, &mut into, 1), 32);
        assert_eq!(into[0][0], (0..32).map(|t| t as f32).collect::<Vec<_>>());
        // The same 32 tokens alone: the last one is left to compute, so one block.
        let mut into = empty();
        assert_eq!(cache.take("", &first[..32], &mut into, 1), 16);
        // Nothing in common within a block.
        let mut into = empty();
        assert_eq!(cache.take("", &[5, 6, 7], &mut into, 1), 0);
        assert!(into[0][0].is_empty());
    }

    #[test]
    fn longer_entries_replace_what_they_extend_and_the_oldest_go_first() {
        let mut cache = PrefixCache::new(64);
        let turn: Vec<u32> = (0..16).collect();
        cache.insert("", &turn, &kv(&turn), 1);
        let conversation: Vec<u32> = (0..48).collect();
        cache.insert("", &conversation, &kv(&conversation), 1);
        assert_eq!((cache.entries.len(), cache.held), (1, 48));
        // Covered already: nothing new is kept (nor need its keys and values be gathered).
        assert!(cache.covers("", &turn) && cache.covers("", &conversation));
        assert!(!cache.covers("", &(0..64).collect::<Vec<u32>>()));
        assert!(!cache.covers("other-adapter", &turn));
        cache.insert("", &turn, &kv(&turn), 1);
        assert_eq!(cache.held, 48);
        // Over the budget: the least recently used entry goes.
        let other: Vec<u32> = (100..132).collect();
        cache.insert("", &other, &kv(&other), 1);
        assert_eq!(cache.held, 32);
        assert_eq!(cache.entries[0].tokens, other);
        // Bigger than the whole budget: not kept.
        let huge: Vec<u32> = (0..80).collect();
        cache.insert("", &huge, &kv(&huge), 1);
        assert_eq!(cache.held, 32);
        // A budget of 0 keeps nothing.
        let mut off = PrefixCache::new(0);
        off.insert("", &conversation, &kv(&conversation), 1);
        assert!(off.entries.is_empty());
    }

    /// Keys and values depend on the adapter: a prompt through one adapter never starts from
    /// another's (or the base's) entries.
    #[test]
    fn entries_are_kept_per_adapter() {
        let mut cache = PrefixCache::new(1024);
        let prompt: Vec<u32> = (0..40).collect();
        cache.insert("adapter-a", &prompt, &kv(&prompt), 1);
        assert_eq!(cache.peek("", &prompt), 0);
        assert_eq!(cache.peek("adapter-b", &prompt), 0);
        assert_eq!(cache.peek("adapter-a", &prompt), 32);
        // The base's entry for the same tokens is its own, and does not replace a's.
        cache.insert("", &prompt, &kv(&prompt), 1);
        assert_eq!(cache.entries.len(), 2);
        let mut into = empty();
        assert_eq!(cache.take("", &prompt, &mut into, 1), 32);
    }
}
