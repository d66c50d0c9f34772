//! Text generation pieces that do not depend on the graph: sampling, stop sequences, and
//! incremental detokenization that only ever emits whole characters.

pub mod detok;
pub mod llm;
pub mod sampling;
pub mod stop;
