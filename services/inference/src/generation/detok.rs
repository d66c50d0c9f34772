//! Incremental detokenization: the text of each new token, released only as whole UTF-8
//! characters (a character split across byte-level tokens waits for its last byte), and with
//! the spacing a full decode would give.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// Turns a growing token sequence into text deltas.
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    /// Tokens before `prefix` are decoded for context only (their text was released).
    prefix: usize,
    /// Tokens before `read` have been released.
    read: usize,
}

impl Detokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, token: u32) -> Result<String, String> {
        self.ids.push(token);
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).map_err(|e| e.to_string());
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        if now.len() > before.len()
            && !now.ends_with('\u{FFFD}')
            && now.is_char_boundary(before.len())
        {
            let delta = now[before.len()..].to_owned();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// The text of the tokens not released yet, at the end of the sequence: a character
    /// its last token left incomplete comes out as U+FFFD, as a decode of the whole sequence
    /// gives it.
    pub fn finish(&mut self) -> String {
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        let before = decode(&self.ids[self.prefix..self.read]);
        let now = decode(&self.ids[self.prefix..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        match now.get(before.len()..) {
            Some(rest) if now.len() > before.len() => rest.to_owned(),
            _ => String::new(),
        }
    }
}
